"""judge: this shard's pairs, chunk by chunk, through the engine's `choose` (guided decoding on vLLM, label
log-probabilities on transformers): accepted, rejected (with the verdict), or quarantined (with the
reason)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hala.contract import tables
from hala.contract.errors import ConfigError
from hala.contract.step import StepContext
from hala.kit import chunks
from hala.kit.engine import Choice, choice_budget
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


def _quarantined(index: int, row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {
        "id": row.get("id"),
        "origin": row.get("origin"),
        "row_index": index,
        "reason": reason,
        "detail": detail,
        "raw": tables.raw_text(row),
    }


@dataclass
class ChunkPlan:
    k: int
    rows: list[tuple[int, dict[str, Any]]]
    todo: list[tuple[int, dict[str, Any]]]  # the rows sent to the engine, in order, with their indexes
    out: dict[str, list[dict[str, Any]]]
    reasons: Counter
    t0: float


def plan_chunk(
    engine: Any, k: int, rows: list[tuple[int, dict[str, Any]]], cfg: JudgeConfig
) -> tuple[ChunkPlan, list[list[dict[str, str]]]]:
    """Rows that cannot be judged go to the quarantine now; the others become prompts."""
    plan = ChunkPlan(k, rows, [], {name: [] for name in OUTPUTS}, Counter(), time.monotonic())
    prompts = []
    longest = choice_budget(cfg.labels)  # what the engine lets the label take
    for index, row in rows:
        problem = _bad(row)
        if problem is None:
            conv = [{"role": "user", "content": cfg.request(row)}]
            if engine.count_tokens(conv) + longest > cfg.max_model_len:
                problem = ("too_long", f"the prompt does not fit max_model_len {cfg.max_model_len}")
        if problem is not None:
            plan.reasons[problem[0]] += 1
            plan.out["quarantine"].append(_quarantined(index, row, *problem))
        else:
            plan.todo.append((index, row))
            prompts.append(conv)
    return plan, prompts


def finish_chunk(plan: ChunkPlan, picks: list[Choice], cfg: JudgeConfig) -> ChunkPlan:
    for (index, row), pick in zip(plan.todo, picks, strict=True):
        pair = {k: row.get(k) for k in ("id", "origin", "src_lang", "tgt_lang", "src", "tgt")}
        if pick.error:  # a served model's non-answer: the pair is not judged, it is quarantined
            plan.reasons[pick.error] += 1
            plan.out["quarantine"].append(_quarantined(index, row, pick.error, pick.detail))
        elif pick.label == cfg.labels[0]:
            plan.out["accepted"].append(pair)
        else:
            plan.out["rejected"].append(
                {**pair, "verdict": pick.label, "scores": json.dumps(pick.scores) if pick.scores else None}
            )
    return plan


def marker_of(plan: ChunkPlan, engine_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chunk's tables and its marker's counters (hala.kit.chunks writes the files, then the marker)."""
    # from planning to commit
    marker = {
        "rows_in": len(plan.rows),
        "accepted": len(plan.out["accepted"]),
        "rejected": len(plan.out["rejected"]),
        "rows_quarantined": len(plan.out["quarantine"]),
        "by_reason": dict(plan.reasons),
        "seconds": round(time.monotonic() - plan.t0, 3),
        "engine": engine_name,
    }
    return plan.out, marker


def main(cfg: JudgeConfig, ctx: StepContext) -> None:
    import pyarrow as pa

    reader = ctx.input(
        "data"
    ).row_groups()  # footers only: rows are decoded chunk by chunk, this shard's alone
    if not {"src", "tgt"} <= set(reader.columns):
        raise ConfigError(
            f"step '{ctx.step.name}': input 'data' has columns {reader.columns}; the judge reads pairs "
            "(src, tgt)"
        )
    schemas = {
        "accepted": tables.pairs_schema(),
        "rejected": tables.pairs_schema(("verdict", pa.string()), ("scores", pa.string())),
        "quarantine": tables.quarantine_schema(),
    }
    done = chunks.loop(
        ctx,
        cfg,
        reader,
        schemas,
        unit="pairs",
        what="judge",
        stream=lambda engine, jobs: engine.choose_stream(jobs, cfg.labels),
        plan=lambda engine, k, rows: plan_chunk(engine, k, rows, cfg),
        finish=lambda plan, picks, engine_name: marker_of(finish_chunk(plan, picks, cfg), engine_name),
    )
    totals = done.totals
    for name, key in (("accepted", "accepted"), ("rejected", "rejected"), ("quarantine", "rows_quarantined")):
        ctx.set_output(
            name, rows=totals[key], format="parquet", schema="quarantine" if name == "quarantine" else "pairs"
        )
    ctx.count(
        rows_in=totals["rows_in"],
        rows_out=totals["accepted"],
        rows_quarantined=totals["rows_quarantined"],
        rows_removed={"rejected": totals["rejected"]},
    )
    judged = totals["accepted"] + totals["rejected"]
    ctx.metrics.update(
        generation_seconds=done.generation_seconds,
        engines=sorted(done.engines),
        labels=cfg.labels,
        row_range=list(done.row_range),
        files={o: len(f) for o, f in done.files.items()},
        acceptance_rate=round(totals["accepted"] / judged, 4) if judged else None,
    )
