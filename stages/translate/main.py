"""translate: this shard's rows, chunk by chunk: protect spans -> split what is too long -> the engine ->
restore spans -> quality gate -> outputs or quarantine -> commit the chunk (files, then its marker).

A row is translated whole or not at all: one failing turn sends the row to the quarantine with that turn's
reason. A restarted shard skips its committed chunks and starts no engine if nothing is left to do.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hala.contract import spans, tables
from hala.contract.errors import ConfigError
from hala.contract.step import StepContext
from hala.kit import chunks, languages
from hala.kit.engine import Generation, Sampling
from stages.translate import gate
from stages.translate.config import PROMPT_SLACK, TranslateConfig

_PARAGRAPHS = re.compile(r"(\n\s*\n)")
_SENTENCES = re.compile(r"(?<=[.!?؟…])(\s+)")


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Turn:
    """One turn of one row on its way through the model."""

    row: int
    msg: int  # message index; -1 for the src of a pair
    text: str
    spans: list[str]
    masked: str
    pieces: list[str] = field(default_factory=list)  # text and separators, alternating
    todo: list[int] = field(default_factory=list)  # pieces that go to the model
    out: dict[int, Any] = field(default_factory=dict)


def split(masked: str, unit: str, fits: Any) -> tuple[list[str], list[int]]:
    """Pieces of the turn (text and separators, in order) and which of them go to the model: paragraphs when
    asked or when the turn is too long for the context, then sentences; a sentence that still does not fit is
    Reject(too_long). Pieces holding only markers, spaces and punctuation are not sent."""
    parts: list[tuple[str, bool]] = [(masked, False)]  # (piece, is_separator)
    if unit == "paragraph" or not fits(masked):
        parts = [(p, i % 2 == 1) for i, p in enumerate(_PARAGRAPHS.split(masked))]
    out: list[tuple[str, bool]] = []
    for piece, sep in parts:
        if sep or fits(piece):
            out.append((piece, sep))
            continue
        for k, sentence in enumerate(_SENTENCES.split(piece)):
            if k % 2 == 0 and not fits(sentence):
                raise Reject(
                    "too_long", f"a sentence of {len(sentence)} characters does not fit max_model_len"
                )
            out.append((sentence, k % 2 == 1))
    todo = [i for i, (p, sep) in enumerate(out) if not sep and p.strip() and not spans.only_markers(p)]
    return [p for p, _ in out], todo


def plan_row(row: dict[str, Any], r: int, cfg: TranslateConfig, fits: Any) -> list[Turn]:
    """The turns of one row that need the model; Reject when the row itself is unusable."""
    src_lang, tgt_lang = cfg.languages
    items: list[tuple[int, Any]]
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise Reject("invalid_row", "messages is not a non-empty list")
        items = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise Reject(
                    "unknown_role", f"message {j}: role {m.get('role') if isinstance(m, dict) else m!r}"
                )
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise Reject("invalid_type", f"message {j}: content is {type(content).__name__}, not text")
            if m["role"] in cfg.roles:
                if not (content or "").strip():
                    if m.get("tool_calls"):
                        continue  # an assistant turn that only calls a tool: nothing to translate
                    raise Reject("empty_turn", f"message {j} ({m['role']}) is empty")
                items.append((j, content))
    else:
        if not isinstance(row.get("src"), str) or not row["src"].strip():
            raise Reject("empty_turn", "src is empty or not text")
        items = [(-1, row["src"])]
    turns, plains = [], []
    for j, text in items:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Reject("invalid_utf8", f"message {j}: bytes that are not UTF-8") from None
        try:
            masked, span_list, _ = spans.protect(text)
        except spans.MarkerError as e:
            raise Reject("marker_collision", str(e)) from None
        if cfg.check_source_language:
            plain = spans.MARKER.sub(" ", masked)
            share = languages.script_share(plain, src_lang, tgt_lang)
            if share is not None and share < 0.5:
                raise Reject(
                    "wrong_language", f"message {j}: {share:.0%} of its letters are in the {src_lang} script"
                )
            plains.append(plain)
        turn = Turn(r, j, text, span_list, masked)
        turn.pieces, turn.todo = split(masked, cfg.unit, fits)
        turns.append(turn)
    # the source is identified once a row, its turns together: a source row is trusted unless shown to be in
    # another language, and one call a row instead of one a turn is most of the identifier's cost on this side
    wrong = gate.wrong_language("\n".join(plains), src_lang, cfg.gate.language_id, source=True)
    if wrong:
        raise Reject("wrong_language", f"the source: {wrong}")
    return turns


def assemble(turn: Turn, cfg: TranslateConfig) -> str:
    """The translated turn, spans restored, after the gate; Reject otherwise."""
    src_lang, tgt_lang = cfg.languages
    pieces = list(turn.pieces)
    for i in turn.todo:
        gen = turn.out[i]
        if gen.error:  # a served model's non-answer (bad_response, endpoint_rejected)
            raise Reject(gen.error, f"message {turn.msg}: {gen.detail}")
        if not gen.finished:
            raise Reject(
                "truncated",
                f"message {turn.msg}: the output reached max_tokens ({gen.completion_tokens} tokens)",
            )
        original = pieces[i]
        lead, trail = original[: len(original) - len(original.lstrip())], original[len(original.rstrip()) :]
        pieces[i] = lead + gen.text.strip() + trail
    translated = "".join(pieces)
    problem = gate.check(turn.masked, translated, cfg.gate, src_lang, tgt_lang)
    if problem:
        raise Reject(problem[0], f"message {turn.msg}: {problem[1]}")
    try:
        return spans.restore(translated, turn.spans)
    except spans.MarkerError as e:
        raise Reject("marker_lost", f"message {turn.msg}: {e}") from None


@dataclass
class ChunkPlan:
    """One chunk before generation: each row's turns (or why it cannot be translated) and the requests."""

    k: int
    rows: list[tuple[int, dict[str, Any]]]
    planned: dict[int, list[Turn]]
    rejected: dict[int, Reject]
    requests: list[tuple[Turn, int]]
    t0: float


def plan_chunk(
    engine: Any, k: int, rows: list[tuple[int, dict[str, Any]]], cfg: TranslateConfig, budget: int
) -> tuple[ChunkPlan, list[list[dict[str, str]]]]:
    """The chunk's turns and their prompts (one per piece still to translate)."""
    t0 = time.monotonic()
    prompt_overhead = engine.count_tokens([{"role": "user", "content": cfg.request("")}]) + PROMPT_SLACK

    def fits(text: str) -> bool:  # cheap bound first, the tokenizer only near the limit
        return (
            len(text) < (budget - prompt_overhead)
            or len(engine.tok.encode(text, add_special_tokens=False)) + prompt_overhead <= budget
        )

    planned: dict[int, list[Turn]] = {}
    rejected: dict[int, Reject] = {}
    for r, (_, row) in enumerate(rows):
        try:
            planned[r] = plan_row(row, r, cfg, fits)
        except Reject as e:
            rejected[r] = e
    requests = [(t, i) for turns in planned.values() for t in turns for i in t.todo]
    prompts = [[{"role": "user", "content": cfg.request(t.pieces[i].strip())}] for t, i in requests]
    return ChunkPlan(k, rows, planned, rejected, requests, t0), prompts


def finish_chunk(plan: ChunkPlan, gens: list[Generation], cfg: TranslateConfig) -> dict[str, Any]:
    """Outputs, quarantine and counters of one chunk, from its plan and the engine's generations."""
    rows, planned, rejected, requests = plan.rows, plan.planned, plan.rejected, plan.requests
    for (t, i), g in zip(requests, gens, strict=True):
        t.out[i] = g
    src_lang, tgt_lang = cfg.languages
    out: dict[str, list[dict[str, Any]]] = {"conversations": [], "pairs": [], "tuples": [], "quarantine": []}
    reasons: Counter = Counter()
    for r, (index, row) in enumerate(rows):
        try:
            if r in rejected:
                raise rejected[r]
            done = {t.msg: assemble(t, cfg) for t in planned[r]}
        except Reject as e:
            reasons[e.reason] += 1
            out["quarantine"].append(
                {
                    "id": row.get("id"),
                    "origin": row.get("origin"),
                    "row_index": index,
                    "reason": e.reason,
                    "detail": e.detail,
                    "raw": tables.raw_text(row),
                }
            )
            continue
        if "messages" in row:
            msgs = [{**m, "content": done.get(j, m.get("content"))} for j, m in enumerate(row["messages"])]
            out["conversations"].append({**row, "messages": msgs})
            for j, text in done.items():
                out["pairs"].append(
                    {
                        "id": f"{row['id']}#{j}",
                        "origin": row.get("origin"),
                        "src_lang": src_lang,
                        "tgt_lang": tgt_lang,
                        "src": row["messages"][j]["content"],
                        "tgt": text,
                        "role": row["messages"][j]["role"],
                    }
                )
            roles = [m["role"] for m in row["messages"] if m["role"] != "system"]
            if roles == ["user", "assistant"] and len(done) >= 2:
                u = next(j for j, m in enumerate(row["messages"]) if m["role"] == "user")
                a = next(j for j, m in enumerate(row["messages"]) if m["role"] == "assistant")
                if u in done and a in done:
                    out["tuples"].append(
                        {
                            "id": row["id"],
                            "origin": row.get("origin"),
                            f"instruction_{src_lang}": row["messages"][u]["content"],
                            f"instruction_{tgt_lang}": done[u],
                            f"response_{src_lang}": row["messages"][a]["content"],
                            f"response_{tgt_lang}": done[a],
                        }
                    )
        else:
            out["pairs"].append(
                {**row, "src_lang": src_lang, "tgt_lang": tgt_lang, "tgt": done[-1], "role": None}
            )
    return {
        "out": out,
        "reasons": reasons,
        "requests": len(requests),
        "prompt_tokens": sum(g.prompt_tokens for g in gens),
        "completion_tokens": sum(g.completion_tokens for g in gens),
    }


def marker_of(
    plan: ChunkPlan, result: dict[str, Any], outputs: list[str], engine_name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chunk's tables and its marker's counters (hala.kit.chunks writes the files, then the marker)."""
    quarantined = sum(result["reasons"].values())
    # from planning to commit
    marker = {
        "rows_in": len(plan.rows),
        "rows_out": len(plan.rows) - quarantined,
        "rows_quarantined": quarantined,
        "by_reason": dict(result["reasons"]),
        "rows": {o: len(result["out"][o]) for o in outputs},
        "requests": result["requests"],
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "seconds": round(time.monotonic() - plan.t0, 3),
        "engine": engine_name,
    }
    return {o: result["out"][o] for o in outputs}, marker


def schemas(cfg: TranslateConfig) -> dict[str, Any]:
    import pyarrow as pa

    src, tgt = cfg.languages
    return {
        "conversations": tables.conversations_schema(),
        "pairs": tables.pairs_schema(("role", pa.string())),
        "tuples": pa.schema(
            [
                ("id", pa.string()),
                ("origin", pa.string()),
                (f"instruction_{src}", pa.string()),
                (f"instruction_{tgt}", pa.string()),
                (f"response_{src}", pa.string()),
                (f"response_{tgt}", pa.string()),
            ]
        ),
        "quarantine": tables.quarantine_schema(),
    }


def main(cfg: TranslateConfig, ctx: StepContext) -> None:
    reader = ctx.input(
        "data"
    ).row_groups()  # footers only: rows are decoded chunk by chunk, this shard's alone
    columns = reader.columns
    kind = "conversations" if "messages" in columns else "pairs" if "src" in columns else None
    if kind is None:
        raise ConfigError(
            f"step '{ctx.step.name}': input 'data' has columns {columns}: neither conversations (messages) "
            "nor pairs (src)"
        )
    if kind == "pairs" and set(cfg.outputs) != {"pairs"}:
        raise ConfigError(
            f"step '{ctx.step.name}': a pairs input gives outputs [pairs] only, not {cfg.outputs}"
        )
    outputs = [*cfg.outputs, "quarantine"]
    table_schemas = schemas(cfg)
    sampling = Sampling(**{k: v for k, v in cfg.sampling.items()})
    budget = cfg.max_model_len - sampling.max_tokens  # > PROMPT_SLACK: the config's check

    def note(totals: Any, elapsed: float) -> dict[str, Any]:
        return {
            "tokens": totals["completion_tokens"],
            "tokens_per_s": round(totals["completion_tokens"] / max(elapsed, 1e-9), 1),
        }

    done = chunks.loop(
        ctx,
        cfg,
        reader,
        {o: table_schemas[o] for o in outputs},
        unit="rows",
        what="translate",
        stream=lambda engine, jobs: engine.chat_stream(jobs, sampling),
        plan=lambda engine, k, rows: plan_chunk(engine, k, rows, cfg, budget),
        finish=lambda plan, gens, engine_name: marker_of(
            plan, finish_chunk(plan, gens, cfg), outputs, engine_name
        ),
        progress_note=note,
    )
    totals = done.totals
    for o in outputs:
        ctx.set_output(
            o,
            rows=totals[f"out:{o}"],
            format="parquet",
            schema={
                "conversations": "conversations",
                "pairs": "pairs",
                "tuples": "tuples",
                "quarantine": "quarantine",
            }[o],
        )
    ctx.count(
        rows_in=totals["rows_in"],
        rows_out=totals["rows_out"],
        rows_quarantined=totals["rows_quarantined"],
        rows_removed={},
    )
    # generation throughput without the engine's start-up (30-60 s for vLLM, more than a tiny run's
    # generation)
    ctx.metrics.update(
        generation_seconds=done.generation_seconds,
        engines=sorted(done.engines),
        direction=cfg.direction,
        units=totals["requests"],
        chunks_resumed=done.resumed,
        row_range=list(done.row_range),
        files={o: len(f) for o, f in done.files.items()},
        prompt_tokens=totals["prompt_tokens"],
        completion_tokens=totals["completion_tokens"],
        completion_tokens_per_s=round(totals["completion_tokens"] / max(done.generation_seconds, 1e-9), 1),
    )
