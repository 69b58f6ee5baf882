"""Resumable chunks for long steps (translate, judge): a shard's row range, chunk by chunk, each chunk's
tables committed to the work area (files, then a marker) and appended to the step's outputs as it goes.

    chunks = Chunks(ctx, schemas)  # schemas: output name -> pyarrow schema
    todo, done = chunks.plan(start, stop, size)  # this shard's rows [start, stop) in chunks of `size`
    for k, first, last in todo:  # committed chunks are skipped (their markers are read, not data)
        ...
        chunks.commit(k, {"data": table, "quarantine": qtable}, {"rows_in": ..., ...})
    files = chunks.finish()  # the outputs: part-00000.parquet, ... at a sane size

With an engine stream (hala.kit.engine), the chunks still to do are planned lazily and their results come back
in order:

    jobs = (plan(k, rows) for k, rows in chunks.rows(reader, todo))          # -> (key, prompts)
    for k, key, outs in results(todo, engine.chat_stream(jobs, sampling)):
        ...gate, chunks.commit(k, ...)

Two copies of a chunk's rows, for two purposes. The work area `_work/<fingerprint>/.../chunks/` keeps one
small parquet file per chunk and output, so a killed shard loses at most a chunk. The outputs are written
once, as the chunks are committed, by `tables.PartWriter` into the step's staging folder: files of up to a
million rows with row groups sized for scanning, whatever `chunk_rows` is. Only a resumed shard reads chunk
files back (the chunks committed before it restarted, once, into its outputs); nothing is downloaded to be
uploaded again at finish.

A marker records its chunk's row span and its files, by paths relative to the chunks folder (a store resumed
from another mount point finds them), named after the attempt that wrote them
(`chunk-000005-<attempt>.parquet`: a second writer of the same chunk never overwrites the first one's). The
marker is created only if absent (hala.contract.cas): of two writers of one chunk, the first marker wins and
the other writer stops (exit 75), and before each chunk the writer checks that it still holds the step's
lease. A work area whose markers do not match the plan (another row assignment, from an older hala that gave
shard i the rows `i mod n`, or another chunk size) is set aside whole: resuming it would lose or repeat rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hala.contract import cas, tables
from hala.contract.errors import TemporaryError
from hala.contract.store import safe_relpath

MARKERS = "_done"
LAYOUT = "range/1"  # how rows map to shards and chunks: contiguous ranges (hala.contract.tables.shard_range)


class Chunks:
    def __init__(self, ctx: Any, schemas: dict[str, Any]):
        self.ctx, self.schemas = ctx, schemas
        self.store = ctx.store
        self.root = f"{ctx.work}/chunks"
        self.writers = {
            name: tables.PartWriter(ctx.output_dir(name), schema) for name, schema in schemas.items()
        }
        self.done: dict[int, dict[str, Any]] = {}
        self.spans: dict[int, tuple[int, int]] = {}  # chunk -> its rows [first, stop), from plan()
        self.appended = 0  # chunks [0, appended) are in the outputs

    def _marker(self, k: int) -> str:
        return f"{self.root}/{MARKERS}/{k:06d}.json"

    def _markers(self) -> dict[int, dict[str, Any]]:
        folder = f"{self.root}/{MARKERS}"
        try:
            # not a create's hidden temporary file
            paths = sorted(
                p
                for p in self.store.fs.ls(folder, detail=False, refresh=True)
                if p.rstrip("/").rsplit("/", 1)[-1][:6].isdigit()
            )
        except FileNotFoundError:
            return {}
        with ThreadPoolExecutor(8) as pool:  # on an object store, one GET each: in parallel
            markers = list(pool.map(self.store.read_json, paths))
        return {m["chunk"]: m for m in markers if m}

    def plan(
        self, start: int, stop: int, size: int
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, dict[str, Any]]]]:
        """Rows [start, stop) in chunks of `size`: (k, first row, stop row) still to do, and (k, marker)
        committed."""
        spans = [(k, a, min(a + size, stop)) for k, a in enumerate(range(start, stop, size))]
        markers = self._markers()
        expected = {k: (a, b) for k, a, b in spans}
        stale = [
            k
            for k, m in markers.items()
            if m.get("layout") != LAYOUT or expected.get(k) != (m.get("first"), m.get("stop"))
        ]
        if stale:
            self.ctx.log.warning(
                "work area written for another row assignment: set aside, this shard starts clean",
                chunks=len(markers),
                mismatched=len(stale),
                layout=LAYOUT,
            )
            self.store.fs.rm(self.root, recursive=True)
            markers = {}
        self.done, self.spans = markers, expected
        todo = [(k, a, b) for k, a, b in spans if k not in markers]
        return todo, sorted(markers.items())

    def rows(
        self, reader: Any, todo: list[tuple[int, int, int]], batch_rows: int = 4096
    ) -> Iterator[tuple[int, list[tuple[int, dict[str, Any]]]]]:
        """(k, [(row index, row), ...]) for the chunks to do, decoding only their rows
        (`tables.RowGroups`)."""
        for k, a, b in todo:
            yield k, list(reader.rows(a, b, batch_rows=min(batch_rows, max(b - a, 1))))

    def commit(self, k: int, out: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        """The chunk's tables (pyarrow, or lists of row dicts) as files in the work area, then its marker
        (last, created only if no other writer's is there); then into the outputs, after any committed chunk
        before it."""
        import json

        import pyarrow as pa

        self.ctx.check_lease()  # a writer that lost its lease writes nothing more into the shared work area
        out = {
            name: t if isinstance(t, pa.Table) else pa.Table.from_pylist(t, schema=self.schemas[name])
            for name, t in out.items()
        }
        placed = {}
        attempt = getattr(self.ctx, "attempt", "") or "0"
        for name, table in out.items():
            rel = f"{name}/chunk-{k:06d}-{attempt}.parquet"
            dst = f"{self.root}/{rel}"
            if self.store.is_local:
                # written beside its place, then renamed: /tmp may be another file system (a container's tmpfs
                # over a volume), where a rename fails
                tables.write_table(dst + ".partial", table)
                os.replace(dst + ".partial", dst)
            else:
                tmp = tempfile.mkdtemp(prefix=f"chunk-{k:06d}-")
                try:
                    tables.write_table(os.path.join(tmp, f"{name}.parquet"), table)
                    self.store.fs.put_file(os.path.join(tmp, f"{name}.parquet"), dst)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            placed[name] = rel
        first, stop = self.spans[k]
        marker = {
            "chunk": k,
            "layout": LAYOUT,
            "first": first,
            "stop": stop,
            "files": placed,
            "attempt": attempt,
            **info,
        }
        body = (json.dumps(marker, ensure_ascii=False) + "\n").encode()
        try:
            cas.create(self.store.fs, self._marker(k), body)
        except cas.Conflict:
            if cas.owned(self.store.fs, self._marker(k), body) is None:
                raise TemporaryError(
                    f"chunk {k} was committed by another writer of this step while this one worked; "
                    "this one stops (its lease was lost): rerun the step"
                ) from None
        self._append_done(before=k)
        for name, table in out.items():
            self.writers[name].write(table)
        self.appended = k + 1
        return marker

    def _append_done(self, before: int) -> None:
        """Committed chunks before `before` not yet in the outputs (a resumed shard's): read back, in
        order."""
        import pyarrow.parquet as pq

        for k in range(self.appended, before):
            marker = self.done.get(k)
            if marker is None:
                # plan() makes this impossible
                raise RuntimeError(f"chunk {k} is neither committed nor planned")
            for name, path in marker["files"].items():
                with self.store.fs.open(self._file(path, k), "rb") as f:
                    self.writers[name].write(pq.read_table(f, schema=self.schemas[name]))
        self.appended = max(self.appended, before)

    def _file(self, path: str, k: int) -> str:
        """A marker's file, relative to the chunks folder. Markers written before paths were relative held
        absolute store paths, which break when the store is mounted elsewhere: their last two parts are the
        relative path."""
        if path.startswith("/") or "://" in path:
            path = "/".join(path.rstrip("/").split("/")[-2:])
        return f"{self.root}/{safe_relpath(path, f'chunk marker {self._marker(k)}')}"

    def finish(self) -> dict[str, list[str]]:
        """Every committed chunk in the outputs, in chunk order; the output files by name."""
        if self.done:
            self._append_done(before=max([*self.done, self.appended - 1]) + 1)
        return {name: w.close() for name, w in self.writers.items()}


def results(
    todo: list[tuple[int, int, int]], stream: Iterator[tuple[Any, Any]]
) -> Iterator[tuple[int, Any, Any]]:
    """(k, key, outputs) of an engine stream over the chunks to do, in order. A TemporaryError (exit 75) names
    the chunk whose results were awaited: every chunk before it is committed, so the retry resumes there."""
    for k, first, stop in todo:
        try:
            key, outs = next(stream)
        except TemporaryError as e:
            raise TemporaryError(f"chunk {k} (rows {first}-{stop - 1}): {e}") from e
        yield k, key, outs


# --- the chunk loop of an engine step (translate, judge)
# ------------------------------------------------------------


class Loop:
    """What `loop` did for one shard: totals of the markers' counters (a marker's `rows` dict as
    `out:<name>`), the quarantine's reasons, the engines that answered, the output files, the rows and the
    time without the engine's start-up and shutdown (what the run report's rates divide by)."""

    def __init__(self) -> None:
        from collections import Counter

        self.totals: Counter = Counter()
        self.reasons: Counter = Counter()
        self.engines: set[str] = set()
        self.files: dict[str, list[str]] = {}
        self.resumed = 0
        self.row_range = (0, 0)
        self.generation_seconds = 0.0

    def account(self, marker: dict[str, Any]) -> None:
        for key, value in marker.items():
            if key == "rows" and isinstance(value, dict):
                self.totals.update({f"out:{o}": v for o, v in value.items()})
            elif (
                isinstance(value, int)
                and not isinstance(value, bool)
                and key not in ("chunk", "first", "stop")
            ):
                self.totals[key] += value
        self.reasons.update(marker.get("by_reason") or {})
        self.engines.add(marker["engine"])


def loop(
    ctx: Any,
    cfg: Any,
    reader: Any,
    schemas: dict[str, Any],
    *,
    unit: str,
    what: str,
    stream: Any,
    plan: Any,
    finish: Any,
    progress_note: Any = None,
) -> Loop:
    """This shard's rows of `reader`, chunk by chunk through the step's engine, each chunk committed as it
    comes back.

    The stage brings what is its own: `plan(engine, k, rows) -> (plan, prompts)` checks a chunk's rows and
    makes its prompts; `stream(engine, jobs)` is the engine's stream for them (chat_stream, choose_stream);
    `finish(plan, outs, engine_name) -> (tables, marker)` turns the answers into the chunk's output tables and
    its marker's counters (rows_in, rows_quarantined, by_reason, ...). The rest is here: the shard's row
    range, committed chunks skipped (their markers counted), the engine opened once and closed with the
    engines that answered, chunk k+1 planned and queued before chunk k is committed, the outputs finished, and
    every row of the range accounted for."""
    from hala.kit.engine import StepEngine

    done_loop = Loop()
    i, n = ctx.shard or (0, 1)
    start, stop = tables.shard_range(reader.total, i, n)  # contiguous rows: hala.contract.tables
    done_loop.row_range = (start, stop)
    chunks = Chunks(ctx, schemas)
    engine = StepEngine(ctx, "model", cfg)
    t_all = time.monotonic()
    with ctx.progress(stop - start, unit=unit, what=what) as progress:

        def account(marker: dict[str, Any]) -> None:
            done_loop.account(marker)
            if progress_note is not None:
                progress.note(**progress_note(done_loop.totals, time.monotonic() - t_all))
            progress.update(marker["rows_in"])

        todo, committed = chunks.plan(start, stop, cfg.chunk_rows)
        done_loop.resumed = len(committed)
        for k, marker in committed:
            ctx.log.info("chunk already committed", chunk=k, rows=marker["rows_in"])
            account(marker)
        jobs = (plan(engine.get(), k, batch) for k, batch in chunks.rows(reader, todo))
        for k, planned, outs in results(todo, stream(engine.get(), jobs) if todo else iter(())):
            out, info = finish(planned, outs, engine.get().name)
            marker = chunks.commit(k, out, info)
            ctx.log.info(
                "chunk committed",
                chunk=k,
                **{
                    key: v
                    for key, v in info.items()
                    if key in ("rows_in", "rows_quarantined", "accepted", "rejected", "completion_tokens")
                },
            )
            account(marker)
    engine.close(done_loop.engines)
    done_loop.files = chunks.finish()
    if stop - start != done_loop.totals["rows_in"]:
        raise RuntimeError(f"chunks account for {done_loop.totals['rows_in']} rows of {stop - start}")
    done_loop.generation_seconds = round(
        time.monotonic() - t_all - engine.start_seconds - ctx.timings.get("engine_close_seconds", 0.0), 3
    )
    for reason, count in done_loop.reasons.items():
        ctx.quarantine(reason, count)
    return done_loop
