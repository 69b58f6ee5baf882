"""Read raw rows from local files, fsspec URLs or the Hugging Face Hub.

Every reader yields `(index, row)` where row is a dict, or a `Broken` for a row that could not even be
read (a JSON line that does not parse, bytes that are not UTF-8). Broken rows go to the quarantine; a
file that cannot be read at all (a JSON array with a syntax error) is a DataError naming file and line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from hala.contract.errors import ConfigError, DataError, TemporaryError
from hala.contract.sources import ResolvedInput
from stages.prepare.config import PrepareConfig

SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".text": "text",
}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class Broken:
    reason: str
    detail: str
    raw: str


def _file_format(path: str, cfg: PrepareConfig) -> str:
    if cfg.file_format != "auto":
        return cfg.file_format
    name = path.lower()
    for comp in COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise ConfigError(
        f"{path}: cannot tell the file format from its name; set config file_format (json, jsonl, parquet, "
        "csv, tsv, text)"
    )


def list_files(uri: str, cfg: PrepareConfig) -> tuple[Any, list[str]]:
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.isdir(path):
        pattern = cfg.files or "*"
        found = sorted(p for p in fs.glob(f"{path.rstrip('/')}/**/{pattern}") if fs.isfile(p))
        # manifests, hidden files
        found = [p for p in found if not p.rsplit("/", 1)[-1].startswith(("_", "."))]
        if not found:
            raise DataError(f"{uri}: no files match {pattern!r}")
        return fs, found
    return fs, [path]


def _decode_line(raw: bytes) -> tuple[str | None, Broken | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, Broken(
            "invalid_utf8", f"byte {e.start}: {e.reason}", raw.decode("utf-8", "backslashreplace")
        )


def _iter_json(fs: Any, path: str, uri: str) -> Iterator[Any]:
    """A .json file: a JSON array, parsed row by row as it streams in, or JSON lines under a .json name."""
    with fs.open(path, "rb", compression="infer") as f:
        head = f.read(4096).lstrip()[:1]
    with fs.open(path, "rb", compression="infer") as f:  # opened again: a compressed stream cannot seek back
        if head == b"[":
            yield from iter_json_array(f, uri)
        else:
            yield from _iter_lines(f, json_lines=True)


READ_BYTES = 1 << 20  # read a MiB at a time
MAX_ROW_BYTES = 64 << 20  # one row of a JSON array may be this large; beyond, the array is treated as broken
_SPACE = re.compile(r"[ \t\n\r]*")


def iter_json_array(f: Any, uri: str) -> Iterator[Any]:
    """The elements of a JSON array, one at a time, holding about a MiB of text (and the row being parsed).

    Each element is decoded by json's C decoder (`raw_decode`) from a sliding buffer. An element that does not
    parse yet is read further, up to MAX_ROW_BYTES: a syntax error is a DataError (exit 3) naming the byte
    offset, line and column, after every row before it went through (a malformed array has no rows that can be
    trusted after the error, so nothing past it is read)."""
    decoder = json.JSONDecoder()
    # invalid bytes: rows quarantined later
    incremental = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    buf, pos = "", 0
    bytes_read, lines_before = 0, 0  # bytes decoded so far; newlines in text already dropped from buf
    eof = False

    def more(size: int = READ_BYTES) -> bool:
        nonlocal buf, pos, bytes_read, lines_before, eof
        if eof:
            return False
        chunk = f.read(size)
        bytes_read += len(chunk)
        if not chunk:
            eof = True
            buf += incremental.decode(b"", final=True)
            return False
        lines_before += buf.count("\n", 0, pos)
        buf, pos = buf[pos:] + incremental.decode(chunk), 0
        return True

    def fail(msg: str, at: int) -> DataError:
        byte = bytes_read - len(buf[at:].encode("utf-8", "surrogateescape"))
        line = lines_before + buf.count("\n", 0, at) + 1
        return DataError(
            f"{uri}: not a valid JSON array at byte {byte} (line {line}): {msg}; fix the file or use JSON "
            "lines "
            "(one row per line: a broken line is quarantined, not the file)"
        )

    def skip() -> None:
        nonlocal pos
        while True:
            pos = _SPACE.match(buf, pos).end()  # type: ignore[union-attr]
            if pos < len(buf) or not more():
                return

    skip()
    if buf[pos : pos + 1] != "[":
        raise fail("expected '['", pos)
    pos += 1
    skip()
    if buf[pos : pos + 1] == "]":
        return
    while True:
        need = READ_BYTES
        while True:
            try:
                row, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number may go on in the next read
                    raise json.JSONDecodeError("incomplete", buf, end)
                break
            except json.JSONDecodeError as e:
                if len(buf) - pos > MAX_ROW_BYTES:
                    raise fail(
                        f"a row larger than {MAX_ROW_BYTES >> 20} MiB, or broken JSON: {e.msg}", e.pos
                    ) from None
                if eof:
                    raise fail(e.msg, e.pos) from None
                more(need)  # more of the row, or the end of the file: either way, decode again
                need *= 2  # a long row: read more at a time, so parsing it again stays cheap
        yield row
        pos = end
        skip()
        sep = buf[pos : pos + 1]
        if sep == "]":
            return
        if sep != ",":
            raise fail("expected ',' or ']' after a row" if sep else "the array ends before its ']'", pos)
        pos += 1
        skip()


def _iter_lines(f: Any, json_lines: bool) -> Iterator[Any]:
    for lineno, raw in enumerate(f, 1):
        raw = raw.rstrip(b"\r\n")
        if json_lines and not raw.strip():
            continue  # a blank line between JSON lines is not a row
        text, broken = _decode_line(raw)
        if broken:
            broken.detail = f"line {lineno}, {broken.detail}"
            yield broken
            continue
        if not json_lines:
            yield text
            continue
        try:
            yield json.loads(text)
        except json.JSONDecodeError as e:
            yield Broken("invalid_json", f"line {lineno}, column {e.colno}: {e.msg}", text or "")


def _iter_delimited(
    fs: Any, path: str, uri: str, delimiter: str, header: bool
) -> Iterator[dict[Any, Any] | Broken]:
    with fs.open(path, "rb", compression="infer") as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        names: list[str] | None = None
        for record in reader:
            if header and names is None:
                names = record
                continue
            if not record:
                continue
            if names is not None:
                if len(record) != len(names):
                    yield Broken(
                        "malformed_row",
                        f"line {reader.line_num}: {len(record)} fields, header has {len(names)}",
                        delimiter.join(record),
                    )
                    continue
                yield dict(zip(names, record))
            else:
                yield dict(enumerate(record))


def _iter_parquet(fs: Any, path: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=10_000):
            yield from batch.to_pylist()


def iter_file(fs: Any, path: str, cfg: PrepareConfig) -> Iterator[Any]:
    uri = fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path
    fmt = _file_format(path, cfg)
    if fmt == "json":
        yield from _iter_json(fs, path, uri)
    elif fmt == "jsonl":
        with fs.open(path, "rb", compression="infer") as f:
            yield from _iter_lines(f, json_lines=True)
    elif fmt == "parquet":
        yield from _iter_parquet(fs, path)
    elif fmt in ("csv", "tsv"):
        yield from _iter_delimited(fs, path, uri, "," if fmt == "csv" else "\t", cfg.header)
    elif fmt == "text":
        with fs.open(path, "rb", compression="infer") as f:
            yield from _iter_lines(f, json_lines=False)


def iter_hub(resolved: ResolvedInput, subset: str | None, split: str) -> Iterator[dict[str, Any]]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = f"hub dataset {resolved.uri}" + (f" ({subset})" if subset else "") + f", split {split}"
    try:
        # streaming: the paper takes the first 405K of OpenOrca's 4.2M rows; nothing past max_rows is
        # downloaded
        ds = datasets.load_dataset(
            resolved.uri, subset, split=split, revision=resolved.revision, streaming=True
        )
    except DatasetNotFoundError as e:
        raise ConfigError(f"{where}: {e} (gated sets need HF_TOKEN in the environment)") from None
    except ConnectionError as e:
        raise TemporaryError(f"{where}: {e} (no network, or HF_HUB_OFFLINE=1); worth a retry") from None
    except ValueError as e:  # an unknown split or configuration
        raise ConfigError(f"{where}: {e}") from None
    try:
        yield from ds
    except ConnectionError as e:
        raise TemporaryError(f"{where}: {e}; worth a retry") from None


def iter_input(resolved: ResolvedInput, cfg: PrepareConfig, target: bool = False) -> Iterator[Any]:
    """Every raw row of one input, in order (files of a folder in name order)."""
    if resolved.kind == "hub":
        if target:
            yield from iter_hub(resolved, cfg.target_subset or cfg.subset, cfg.target_split or cfg.split)
        else:
            yield from iter_hub(resolved, cfg.subset, cfg.split)
        return
    uri = resolved.local_path() if resolved.kind == "step" else resolved.uri
    fs, files = list_files(uri, cfg)
    for path in files:
        yield from iter_file(fs, path, cfg)


def count_lines(resolved: ResolvedInput, cfg: PrepareConfig) -> int | None:
    """Line count of a local text input (aligned_text checks both sides up front); None when not cheap."""
    if resolved.kind != "path":
        return None
    fs, files = list_files(resolved.uri, cfg)
    if any(_file_format(p, cfg) != "text" for p in files):
        return None
    total = 0
    for path in files:
        with fs.open(path, "rb", compression="infer") as f:
            total += sum(1 for _ in f)
    return total
