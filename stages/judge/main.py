"""judge: this shard's pairs, chunk by chunk, through the engine's `choose` (guided decoding on vLLM, label
log-probabilities on transformers): accepted, rejected (with the verdict), or quarantined (with the reason)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hala import tables
from hala.chunks import Chunks, results as chunk_results
from hala.engine import Choice, StepEngine
from hala.errors import ConfigError
from hala.step import StepContext
from stages.judge.config import JudgeConfig

OUTPUTS = ["accepted", "rejected", "quarantine"]


def _bad(row: dict[str, Any]) -> tuple[str, str] | None:
    for side in ("src", "tgt"):
        value = row.get(side)
        if not isinstance(value, str):
            return "invalid_type", f"{side} is {type(value).__name__}, not text"
        if not value.strip():
            return "empty_text", f"{side} is empty"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "invalid_utf8", f"{side} holds bytes that are not UTF-8"
    return None


@dataclass
class ChunkPlan:
    k: int
    rows: list[tuple[int, dict[str, Any]]]
    todo: list[dict[str, Any]]  # the rows sent to the engine, in order
    out: dict[str, list[dict[str, Any]]]
    reasons: Counter
    t0: float


def plan_chunk(engine: Any, k: int, rows: list[tuple[int, dict[str, Any]]], cfg: JudgeConfig) -> tuple[ChunkPlan, list[list[dict[str, str]]]]:
    """Rows that cannot be judged go to the quarantine now; the others become prompts."""
    plan = ChunkPlan(k, rows, [], {name: [] for name in OUTPUTS}, Counter(), time.monotonic())
    prompts = []
    longest = max(len(engine.tok.encode(label, add_special_tokens=False)) for label in cfg.labels)
    for index, row in rows:
        problem = _bad(row)
        if problem is None:
            conv = [{"role": "user", "content": cfg.prompt.format(src=row["src"], tgt=row["tgt"])}]
            if engine.count_tokens(conv) + longest > cfg.max_model_len:
                problem = ("too_long", f"the prompt does not fit max_model_len {cfg.max_model_len}")
        if problem is not None:
            plan.reasons[problem[0]] += 1
            plan.out["quarantine"].append({"id": row.get("id"), "origin": row.get("origin"), "row_index": index, "reason": problem[0],
                                           "detail": problem[1], "raw": tables.raw_text(row)})
        else:
            plan.todo.append(row)
            prompts.append(conv)
    return plan, prompts


def finish_chunk(plan: ChunkPlan, picks: list[Choice], cfg: JudgeConfig) -> ChunkPlan:
    for row, pick in zip(plan.todo, picks, strict=True):
        pair = {k: row.get(k) for k in ("id", "origin", "src_lang", "tgt_lang", "src", "tgt")}
        if pick.label == cfg.labels[0]:
            plan.out["accepted"].append(pair)
        else:
            plan.out["rejected"].append({**pair, "verdict": pick.label, "scores": json.dumps(pick.scores) if pick.scores else None})
    return plan


def commit_chunk(chunks: Chunks, plan: ChunkPlan, engine_name: str) -> dict[str, Any]:
    """The chunk's parquet files, then its marker: a restarted shard skips the chunk from then on."""
    marker = {"rows_in": len(plan.rows), "accepted": len(plan.out["accepted"]), "rejected": len(plan.out["rejected"]),
              "rows_quarantined": len(plan.out["quarantine"]), "by_reason": dict(plan.reasons),
              "seconds": round(time.monotonic() - plan.t0, 3), "engine": engine_name}  # from planning to commit
    return chunks.commit(plan.k, plan.out, marker)


def main(cfg: JudgeConfig, ctx: StepContext) -> None:
    import pyarrow as pa

    reader = ctx.input("data").row_groups()  # footers only: rows are decoded chunk by chunk, this shard's alone
    if not {"src", "tgt"} <= set(reader.columns):
        raise ConfigError(f"step '{ctx.step.name}': input 'data' has columns {reader.columns}; the judge reads pairs (src, tgt)")
    i, n = ctx.shard or (0, 1)
    start, stop = tables.shard_range(reader.total, i, n)  # contiguous rows: hala.tables
    schemas = {"accepted": tables.pairs_schema(),
               "rejected": tables.pairs_schema(("verdict", pa.string()), ("scores", pa.string())),
               "quarantine": tables.quarantine_schema()}
    chunks = Chunks(ctx, schemas)
    engine = StepEngine(ctx, "model", cfg)
    totals: Counter = Counter()
    reasons: Counter = Counter()
    engines: set[str] = set()
    t_all = time.monotonic()
    with ctx.progress(stop - start, unit="pairs", what="judge") as progress:

        def account(marker: dict[str, Any]) -> None:
            for key in ("rows_in", "accepted", "rejected", "rows_quarantined"):
                totals[key] += marker[key]
            reasons.update(marker["by_reason"])
            engines.add(marker["engine"])
            progress.update(marker["rows_in"])

        todo, done = chunks.plan(start, stop, cfg.chunk_rows)
        for k, marker in done:
            ctx.log.info("chunk already committed", chunk=k, pairs=marker["rows_in"])
            account(marker)
        # chunk k+1 is checked and queued in the engine before chunk k is written (hala.engine)
        jobs = (plan_chunk(engine.get(), k, batch, cfg) for k, batch in chunks.rows(reader, todo))
        for k, plan, picks in chunk_results(todo, engine.get().choose_stream(jobs, cfg.labels) if todo else iter(())):
            marker = commit_chunk(chunks, finish_chunk(plan, picks, cfg), engine.get().name)
            ctx.log.info("chunk committed", chunk=k, pairs=len(plan.rows), accepted=marker["accepted"], rejected=marker["rejected"])
            account(marker)
    engine.close(engines)
    files = chunks.finish()
    for name, key in (("accepted", "accepted"), ("rejected", "rejected"), ("quarantine", "rows_quarantined")):
        ctx.set_output(name, rows=totals[key], format="parquet", schema="quarantine" if name == "quarantine" else "pairs")
    for reason, count in reasons.items():
        ctx.quarantine(reason, count)
    ctx.count(rows_in=totals["rows_in"], rows_out=totals["accepted"], rows_quarantined=totals["rows_quarantined"],
              rows_removed={"rejected": totals["rejected"]})
    judged = totals["accepted"] + totals["rejected"]
    # the shard's own time without the engine's start-up and shutdown: what the run report's rates divide by
    elapsed = (time.monotonic() - t_all - engine.start_seconds
               - ctx.timings.get("engine_close_seconds", 0.0))
    ctx.metrics["generation_seconds"] = round(elapsed, 3)
    if stop - start != totals["rows_in"]:
        raise RuntimeError(f"chunks account for {totals['rows_in']} rows of {stop - start}")
    ctx.metrics.update(engines=sorted(engines), labels=cfg.labels, row_range=[start, stop], files={o: len(f) for o, f in files.items()}, acceptance_rate=round(totals["accepted"] / judged, 4) if judged else None)
