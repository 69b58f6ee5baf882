"""prepare: read -> normalize -> filter (code, duplicates) -> parquet shards + quarantine.

Every row read is accounted for: rows_in = rows_out + rows_quarantined + rows_removed (duplicates,
code), and the manifest says so. Nothing is dropped silently.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from hala.contract import tables
from hala.contract.errors import DataError
from hala.contract.step import StepContext
from stages.prepare import dedup, formats, readers
from stages.prepare.config import PrepareConfig
from stages.prepare.readers import Broken

CONVERSATIONS = tables.conversations_schema()
PAIRS = tables.pairs_schema()
QUARANTINE = tables.quarantine_schema()


class ShardWriter:
    """Rows to `part-00000.parquet`, `part-00001.parquet`, ... of `rows_per_file` rows each, through
    `tables.PartWriter` (row groups sized for scanning and for shards that read a range): a batch of dicts at
    a time becomes Arrow, so memory follows the batch, not the file. At least one file, so readers find a
    table."""

    BATCH = 2048

    def __init__(self, folder: str, schema: pa.Schema, rows_per_file: int):
        self.schema = schema
        self.parts = tables.PartWriter(
            folder, schema, file_rows=rows_per_file, group_rows=min(tables.GROUP_ROWS, rows_per_file)
        )
        self.buffer: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        self.rows += 1
        if len(self.buffer) >= self.BATCH:
            self.parts.write_rows(self.buffer)
            self.buffer = []

    def close(self) -> None:
        if self.buffer:
            self.parts.write_rows(self.buffer)
            self.buffer = []
        self.parts.close()


def _rows(ctx: StepContext, cfg: PrepareConfig) -> Iterator[Any]:
    """Raw rows, each a dict, a Broken, or for aligned_text a (source, target) tuple."""
    if cfg.format != "aligned_text":
        if ctx.has_input("target"):
            raise DataError(f"step '{ctx.step.name}': input 'target' is only read by format aligned_text")
        yield from readers.iter_input(ctx.input("source"), cfg)
        return
    if not ctx.has_input("target"):
        raise DataError(f"step '{ctx.step.name}': format aligned_text needs inputs source and target")
    src, tgt = ctx.input("source"), ctx.input("target")
    n_src, n_tgt = readers.count_lines(src, cfg), readers.count_lines(tgt, cfg)
    if n_src is not None and n_tgt is not None and n_src != n_tgt:
        raise DataError(
            f"aligned_text: {src.ref.raw} has {n_src} lines but {tgt.ref.raw} has {n_tgt}; the sides are "
            "not aligned"
        )
    end = object()
    pairs = itertools.zip_longest(
        readers.iter_input(src, cfg), readers.iter_input(tgt, cfg, target=True), fillvalue=end
    )
    for i, (a, b) in enumerate(pairs):
        if a is end or b is end:
            longer = "target" if a is end else "source"
            raise DataError(
                f"aligned_text: the {longer} side has more rows than the other ({i} rows matched); the "
                "sides are not aligned"
            )
        yield a if isinstance(a, Broken) else b if isinstance(b, Broken) else (a, b)


def main(cfg: PrepareConfig, ctx: StepContext) -> None:
    origin = cfg.origin or ctx.step.name.removeprefix("prepare-")
    kind = cfg.kind
    data = ShardWriter(
        ctx.output_dir("data"), CONVERSATIONS if kind == "conversations" else PAIRS, cfg.rows_per_file
    )
    quarantine = ShardWriter(ctx.output_dir("quarantine"), QUARANTINE, cfg.rows_per_file)
    seen = dedup.SeenSet()
    pending: list[tuple[int, dict[str, Any]]] = []  # rows waiting for the batched duplicate check, in order
    removed = {"duplicates": 0, "code": 0, "excluded": 0}
    stats = {"turns": 0, "multi_turn_rows": 0, "tool_rows": 0, "src_chars": 0, "tgt_chars": 0}
    rows_in = 0
    t0 = time.monotonic()

    def keep(out: dict[str, Any]) -> None:
        data.add(out)
        if kind == "conversations":
            stats["turns"] += len(out["messages"])
            stats["multi_turn_rows"] += sum(m["role"] == "user" for m in out["messages"]) > 1
            stats["tool_rows"] += bool(out["tools"]) or any(
                m["tool_calls"] or m["role"] == "tool" for m in out["messages"]
            )
        else:
            stats["src_chars"] += len(out["src"])
            stats["tgt_chars"] += len(out["tgt"])

    def flush() -> None:
        for first, (_, out) in zip(seen.first_seen([d for d, _ in pending]), pending):
            if first:
                keep(out)
            else:
                removed["duplicates"] += 1
        pending.clear()

    with ctx.progress(cfg.max_rows, unit="rows", what="normalize") as progress:
        for index, raw in enumerate(_rows(ctx, cfg)):
            if cfg.max_rows is not None and index >= cfg.max_rows:
                break
            rows_in += 1
            progress.update()
            row_id = f"{origin}:{index}"
            try:
                if isinstance(raw, Broken):
                    raise formats.Reject(raw.reason, raw.detail)
                if (
                    cfg.exclude
                    and isinstance(raw, dict)
                    and any(raw.get(k) in v for k, v in cfg.exclude.items())
                ):
                    removed["excluded"] += 1
                    continue
                if kind == "conversations":
                    messages, tools = formats.conversation(raw, cfg)
                    if cfg.drop_code and formats.has_code(messages):
                        removed["code"] += 1
                        continue
                    key = dedup.conversation_key(messages, tools)
                    out: dict[str, Any] = {
                        "id": row_id,
                        "origin": origin,
                        "messages": messages,
                        "tools": tools,
                    }
                else:
                    src, tgt = formats.pair(raw, cfg)
                    key = dedup.pair_key(src, tgt)
                    out = {
                        "id": row_id,
                        "origin": origin,
                        "src_lang": cfg.src_lang,
                        "tgt_lang": cfg.tgt_lang,
                        "src": src,
                        "tgt": tgt,
                    }
            except formats.Reject as r:
                ctx.quarantine(r.reason)
                quarantine.add(
                    {
                        "id": row_id,
                        "origin": origin,
                        "row_index": index,
                        "reason": r.reason,
                        "detail": r.detail,
                        "raw": tables.raw_text(raw.raw if isinstance(raw, Broken) else raw),
                    }
                )
                continue
            if not cfg.dedup:
                keep(out)
                continue
            pending.append((dedup.digest(key), out))
            if len(pending) >= ShardWriter.BATCH:
                flush()
        flush()
    data.close()
    quarantine.close()
    ctx.timings["normalize_seconds"] = round(time.monotonic() - t0, 3)
    ctx.set_output(
        "data", rows=data.rows, format="parquet", schema=kind, columns=[f.name for f in data.schema]
    )
    ctx.set_output("quarantine", rows=quarantine.rows, format="parquet", schema="quarantine")
    ctx.count(
        rows_in=rows_in,
        rows_out=data.rows,
        rows_quarantined=quarantine.rows,
        rows_removed={k: v for k, v in removed.items() if v or k == "duplicates"},
    )
    if kind == "conversations":
        ctx.metrics.update(
            mean_turns=round(stats["turns"] / max(data.rows, 1), 3),
            multi_turn_rows=stats["multi_turn_rows"],
            tool_rows=stats["tool_rows"],
        )
    else:
        ctx.metrics.update(
            src_lang=cfg.src_lang,
            tgt_lang=cfg.tgt_lang,
            tgt_src_char_ratio=round(stats["tgt_chars"] / max(stats["src_chars"], 1), 3),
        )
    ctx.metrics["origin"] = origin
    ctx.log.info(
        "normalized", rows_in=rows_in, rows_out=data.rows, quarantined=dict(ctx.quarantined), removed=removed
    )
