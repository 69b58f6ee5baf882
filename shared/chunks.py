"""Resumable chunks for long steps (translate, judge): a chunk's files first, then its marker.

    chunks = Chunks(ctx)
    for k, rows in enumerate(batches):
        if chunks.done(k):            # committed before a crash or a preemption: skip it
            continue
        ...write local files...
        chunks.commit(k, {"data": path, "quarantine": qpath}, {"rows_in": ..., ...})
    chunks.finish()                   # move every chunk file into the step's outputs, in chunk order

With an engine stream (hala.engine), the chunks still to do are planned lazily and their results come back in order:

    todo, done = split(chunks, rows, size)
    jobs = (plan(k, batch) for k, _, batch in todo)           # -> (key, prompts)
    for k, key, outs in results(todo, engine.chat_stream(jobs, sampling)):
        ...gate, write, chunks.commit(k, ...)

Chunks live in the step's (or shard's) work area `_work/<fingerprint>/.../chunks/`: a rerun with the same
fingerprint resumes after the last committed chunk; another fingerprint starts clean. Format-agnostic: the
stage writes the files (parquet, usually), this only places them and keeps the markers.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterator

from hala.errors import TemporaryError

MARKERS = "_done"


class Chunks:
    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.store = ctx.store
        self.root = f"{ctx.work}/chunks"

    def _marker(self, k: int) -> str:
        return f"{self.root}/{MARKERS}/{k:06d}.json"

    def done(self, k: int) -> dict[str, Any] | None:
        return self.store.read_json(self._marker(k))

    def committed(self) -> list[dict[str, Any]]:
        folder = f"{self.root}/{MARKERS}"
        if not self.store.fs.exists(folder):
            return []
        return [self.store.read_json(p) or {} for p in sorted(self.store.fs.ls(folder, detail=False))]

    def commit(self, k: int, files: dict[str, str], info: dict[str, Any]) -> None:
        """Place the chunk's local files under chunks/<output>/, then write its marker (last)."""
        placed = {}
        for output, local in files.items():
            ext = os.path.splitext(local)[1]
            dst = f"{self.root}/{output}/chunk-{k:06d}{ext}"
            if self.store.is_local:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.move(local, dst)
            else:
                self.store.fs.put(local, dst)
                os.remove(local)  # moved, as on a local store: the caller's folder is empty again
            placed[output] = dst
        self.store.write_json(self._marker(k), {"chunk": k, "files": placed, **info})

    def finish(self, outputs: list[str]) -> None:
        """Every committed chunk file into the staging folder of its output (chunk order is file order)."""
        for output in outputs:
            dest = self.ctx.output_dir(output)
            folder = f"{self.root}/{output}"
            if not self.store.fs.exists(folder):
                continue
            for src in sorted(self.store.fs.ls(folder, detail=False)):
                name = src.rstrip("/").rsplit("/", 1)[-1]
                if self.store.is_local:
                    shutil.move(src, os.path.join(dest, name))
                else:
                    self.store.fs.get(src, os.path.join(dest, name))


def split(chunks: Chunks, rows: list[Any], size: int) -> tuple[list[tuple[int, int, list[Any]]], list[tuple[int, dict[str, Any]]]]:
    """This shard's rows in chunks of `size`: (k, first row, rows) still to do, and (k, marker) already committed."""
    todo, done = [], []
    for k, start in enumerate(range(0, len(rows), size)):
        marker = chunks.done(k)
        if marker is None:
            todo.append((k, start, rows[start : start + size]))
        else:
            done.append((k, marker))
    return todo, done


def results(todo: list[tuple[int, int, list[Any]]], stream: Iterator[tuple[Any, Any]]) -> Iterator[tuple[int, Any, Any]]:
    """(k, key, outputs) of an engine stream over the chunks to do, in order. A TemporaryError (exit 75) names the
    chunk whose results were awaited: every chunk before it is committed, so the retry resumes there."""
    for k, start, batch in todo:
        try:
            key, outs = next(stream)
        except TemporaryError as e:
            raise TemporaryError(f"chunk {k} (shard rows {start}-{start + len(batch) - 1}): {e}") from e
        yield k, key, outs
