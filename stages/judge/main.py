"""judge: this shard's pairs, chunk by chunk, through the engine's `choose` (guided decoding on vLLM, label
log-probabilities on transformers): accepted, rejected (with the verdict), or quarantined (with the reason)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from typing import Any

from hala import tables
from hala.chunks import Chunks
from hala.engine import StepEngine
from hala.errors import ConfigError, TemporaryError
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


def judge_chunk(engine: Any, rows: list[tuple[int, dict[str, Any]]], cfg: JudgeConfig) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in OUTPUTS}
    reasons: Counter = Counter()
    todo: list[tuple[int, dict[str, Any], list[dict[str, str]]]] = []
    for index, row in rows:
        problem = _bad(row)
        conv = None
        if problem is None:
            conv = [{"role": "user", "content": cfg.prompt.format(src=row["src"], tgt=row["tgt"])}]
            longest = max(len(engine.tok.encode(label, add_special_tokens=False)) for label in cfg.labels)
            if engine.count_tokens(conv) + longest > cfg.max_model_len:
                problem = ("too_long", f"the prompt does not fit max_model_len {cfg.max_model_len}")
        if problem is not None:
            reasons[problem[0]] += 1
            out["quarantine"].append({"id": row.get("id"), "origin": row.get("origin"), "row_index": index, "reason": problem[0],
                                      "detail": problem[1], "raw": tables.raw_text(row)})
        else:
            todo.append((index, row, conv))
    picks = engine.choose([c for _, _, c in todo], cfg.labels) if todo else []
    for (_, row, _), pick in zip(todo, picks):
        pair = {k: row.get(k) for k in ("id", "origin", "src_lang", "tgt_lang", "src", "tgt")}
        if pick.label == cfg.labels[0]:
            out["accepted"].append(pair)
        else:
            out["rejected"].append({**pair, "verdict": pick.label, "scores": json.dumps(pick.scores) if pick.scores else None})
    return {"out": out, "reasons": reasons}


def main(cfg: JudgeConfig, ctx: StepContext) -> None:
    import pyarrow as pa

    rows, columns = tables.read(ctx.input("data").local_path())
    if not {"src", "tgt"} <= set(columns):
        raise ConfigError(f"step '{ctx.step.name}': input 'data' has columns {columns}; the judge reads pairs (src, tgt)")
    i, n = ctx.shard or (0, 1)
    mine = [(idx, row) for idx, row in enumerate(rows) if idx % n == i]
    schemas = {"accepted": tables.pairs_schema(),
               "rejected": tables.pairs_schema(("verdict", pa.string()), ("scores", pa.string())),
               "quarantine": tables.quarantine_schema()}
    chunks = Chunks(ctx)
    engine = StepEngine(ctx, "model", cfg)
    totals: Counter = Counter()
    reasons: Counter = Counter()
    engines: set[str] = set()
    with ctx.progress(len(mine), unit="pairs", what="judge") as progress:
        for k, start in enumerate(range(0, len(mine), cfg.chunk_rows)):
            batch = mine[start : start + cfg.chunk_rows]
            marker = chunks.done(k)
            if marker is None:
                t0 = time.monotonic()
                try:
                    result = judge_chunk(engine.get(), batch, cfg)
                except TemporaryError as e:  # the retry resumes here: say where
                    raise TemporaryError(f"chunk {k} (shard rows {start}-{start + len(batch) - 1}): {e}") from e
                tmp = tempfile.mkdtemp(prefix=f"chunk-{k:06d}-")
                files = {}
                for name in OUTPUTS:
                    files[name] = os.path.join(tmp, f"{name}.parquet")
                    tables.write(files[name], result["out"][name], schemas[name])
                marker = {"rows_in": len(batch), "accepted": len(result["out"]["accepted"]), "rejected": len(result["out"]["rejected"]),
                          "rows_quarantined": len(result["out"]["quarantine"]), "by_reason": dict(result["reasons"]),
                          "seconds": round(time.monotonic() - t0, 3), "engine": engine.get().name}
                chunks.commit(k, files, marker)
                os.rmdir(tmp)
                ctx.log.info("chunk committed", chunk=k, pairs=len(batch), accepted=marker["accepted"], rejected=marker["rejected"])
            else:
                ctx.log.info("chunk already committed", chunk=k, pairs=marker["rows_in"])
            for key in ("rows_in", "accepted", "rejected", "rows_quarantined"):
                totals[key] += marker[key]
            reasons.update(marker["by_reason"])
            engines.add(marker["engine"])
            progress.update(len(batch))
    engine.close(engines)
    chunks.finish(OUTPUTS)
    for name, key in (("accepted", "accepted"), ("rejected", "rejected"), ("quarantine", "rows_quarantined")):
        ctx.set_output(name, rows=totals[key], format="parquet", schema="quarantine" if name == "quarantine" else "pairs")
    for reason, count in reasons.items():
        ctx.quarantine(reason, count)
    ctx.count(rows_in=totals["rows_in"], rows_out=totals["accepted"], rows_quarantined=totals["rows_quarantined"],
              rows_removed={"rejected": totals["rejected"]})
    judged = totals["accepted"] + totals["rejected"]
    ctx.metrics.update(engines=sorted(engines), labels=cfg.labels, acceptance_rate=round(totals["accepted"] / judged, 4) if judged else None)
