"""Safetensors checkpoints, one tensor (and one slice of rows) at a time.

Reading goes through the safetensors library; each read opens and closes the file, so no mapping of a
whole multi-GB shard stays resident. Writing is streamed: every tensor's dtype and shape are known before
the first byte is written (they come from the inputs), so each shard's header is written first and the
merged rows are appended as they are computed, by a writer thread that also hashes them. safetensors' own
writer takes a whole shard as a dict of tensors, which would hold gigabytes; the format itself is an 8-byte
header length, a JSON header with each tensor's dtype, shape and byte range, and the raw little-endian bytes
in that order.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from hala.contract.errors import DataError

SAFE_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # rows are read and merged in chunks of about 4M elements (16 MB in fp32)


@dataclass
class TensorInfo:
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name, e.g. BF16


class Checkpoint:
    """The tensors of a Hugging Face folder: model.safetensors or model.safetensors.index.json with shards."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            weight_map = json.load(open(index))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            raise DataError(
                f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors "
                "checkpoints are merged)"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            path = os.path.join(folder, fname)
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.tensors[name] = TensorInfo(name, path, tuple(sl.get_shape()), sl.get_dtype())
        self.config = json.load(open(os.path.join(folder, "config.json")))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.tensors[name]
        with safe_open(info.file, framework="pt") as f:
            if not info.shape:
                return f.get_tensor(name)
            return f.get_slice(name)[start:stop]

    def num_layers(self) -> int:
        cfg = self.config.get("text_config", self.config)
        return int(cfg.get("num_hidden_layers", 0) or 0)


def chunk_rows(shape: tuple[int, ...]) -> int:
    if not shape:
        return 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    return max(1, ROWS_PER_CHUNK_ELEMENTS // max(per_row, 1))


class StreamWriter:
    """Writes planned tensors shard by shard; each tensor's bytes arrive in row chunks, in plan order.

    A thread writes and hashes (sha256) while the caller merges the next chunk: file writes and hashlib
    release the GIL, so disk, hashing and torch overlap; a bounded queue keeps a few chunks in flight. The
    digests spare the store a second read of every shard at commit (`digests`, after close)."""

    IN_FLIGHT = 4

    def __init__(
        self, folder: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int
    ):
        self.folder = folder
        sizes = [(name, shape, dtype, _nbytes(shape, dtype)) for name, shape, dtype in plan]
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        for item in sizes:
            if self.shards[-1] and used + item[3] > max_shard_size:
                self.shards.append([])
                used = 0
            self.shards[-1].append(item)
            used += item[3]
        n = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.weight_map = {item[0]: self.names[i] for i, shard in enumerate(self.shards) for item in shard}
        self._order = [(i, item) for i, shard in enumerate(self.shards) for item in shard]
        self._pos = -1
        self._written = 0
        self._shard = -1
        self.digests: dict[str, tuple[str, int]] = {}  # file path -> (sha256, bytes)
        self._queue: queue.Queue = queue.Queue(self.IN_FLIGHT)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="merge-writer", daemon=True)
        self._thread.start()

    def begin(self, name: str) -> None:
        """Start the next tensor of the plan (it must be `name`)."""
        self._finish_tensor()
        self._pos += 1
        shard, (planned, _, _, _) = self._order[self._pos]
        if planned != name:
            raise RuntimeError(f"tensor {name} written out of plan order (expected {planned})")
        if shard != self._shard:
            self._shard = shard
            self._put(("open", shard))
        self._written = 0

    def write(self, chunk: torch.Tensor) -> None:
        _, (_, _, dtype, _) = self._order[self._pos]
        data = chunk.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()  # keeps the tensor alive
        self._put(("data", data))
        self._written += data.nbytes

    def _put(self, item: tuple[str, Any]) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self.folder} failed: {self._error}") from self._error
        self._queue.put(item)

    def _drain(self) -> None:
        file, digest, path = None, None, ""
        try:
            while True:
                kind, value = self._queue.get()
                if kind in ("open", "close") and file is not None:
                    file.close()
                    self.digests[path] = (digest.hexdigest(), os.path.getsize(path))
                    file = None
                if kind == "close":
                    return
                if kind == "open":
                    path = os.path.join(self.folder, self.names[value])
                    file, digest = open(path, "wb"), hashlib.sha256()
                    value = self._header(value)
                file.write(memoryview(value))
                digest.update(memoryview(value))
        except BaseException as e:  # noqa: BLE001 (reported by the caller's next write or close)
            self._error = e
            while True:  # keep taking items so that the caller never blocks on a full queue
                if self._queue.get()[0] == "close":
                    return

    def _finish_tensor(self) -> None:
        if self._pos >= 0:
            _, (name, _, _, nbytes) = self._order[self._pos]
            if self._written != nbytes:
                raise RuntimeError(f"tensor {name}: wrote {self._written} bytes, planned {nbytes}")

    def _header(self, shard: int) -> bytes:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[shard]:
            header[name] = {
                "dtype": SAFE_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        return struct.pack("<Q", len(raw)) + raw

    def close(self) -> dict[str, Any]:
        self._finish_tensor()
        self._queue.put(("close", None))
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing {self.folder} failed: {self._error}") from self._error
        if self._pos != len(self._order) - 1:
            raise RuntimeError(f"{len(self._order) - 1 - self._pos} planned tensors were not written")
        total = sum(item[3] for shard in self.shards for item in shard)
        if len(self.names) > 1:
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))},
                    f,
                    indent=2,
                )
        return {"shards": len(self.names), "bytes": total}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty(0, dtype=dtype).element_size()
