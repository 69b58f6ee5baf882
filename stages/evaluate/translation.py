"""Translation quality with sacrebleu, and the FP8 acceptance check built on it.

Each model translates the same source texts greedily through the serving engine (hala.kit.engine: vLLM, or
transformers); BLEU (13a or intl) and chrF++ come from sacrebleu on the whole corpus, with their
signatures. Throughput is completion tokens per second of the generation call alone (engine start-up is
timed apart), so the FP8/source ratio compares the models, not the start-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hala.contract import tables
from hala.contract.errors import DataError
from hala.kit.engine import Sampling
from stages.evaluate.config import EvaluateConfig


@dataclass
class Pairs:
    ids: list[str] = field(default_factory=list)
    src: list[str] = field(default_factory=list)
    ref: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)


def read_pairs(reader: tables.RowGroups, cfg: EvaluateConfig, where: str) -> Pairs:
    """The pairs to score, read a record batch at a time and only as far as `max_rows` needs (a test split of
    a million-row corpus costs its first row groups, not the whole table)."""
    columns = reader.columns
    if not {"src", "tgt"} <= set(columns):
        raise DataError(
            f"{where}: expected a pairs dataset (columns src, tgt), found "
            f"{', '.join(columns) or 'no parquet files'} in {reader.paths[0]}"
        )
    want_src, want_tgt = cfg.direction.split("-")
    out = Pairs()
    wanted = [c for c in ("id", "src_lang", "tgt_lang", "src", "tgt") if c in columns]
    for i, r in reader.rows(columns=wanted):
        if cfg.max_rows is not None and len(out.ids) >= cfg.max_rows:
            break
        langs = (r.get("src_lang"), r.get("tgt_lang"))
        if langs == (want_src, want_tgt):
            s, t = r.get("src") or "", r.get("tgt") or ""
        elif langs == (want_tgt, want_src):
            s, t = r.get("tgt") or "", r.get("src") or ""
        else:
            out.skipped["other_direction"] = out.skipped.get("other_direction", 0) + 1
            continue
        if not s.strip() or not t.strip():
            out.skipped["empty"] = out.skipped.get("empty", 0) + 1
            continue
        out.ids.append(str(r.get("id") or i))
        out.src.append(s.strip())
        out.ref.append(t.strip())
    if not out.ids:
        raise DataError(
            f"{where}: no {cfg.direction} pair to score in {reader.paths[0]} (skipped: "
            f"{out.skipped or 'none'})"
        )
    return out


def translate(model: str, pairs: Pairs, cfg: EvaluateConfig) -> dict[str, Any]:
    """Greedy translations of every source, the engine's description and the generation's throughput."""
    t0 = time.monotonic()
    engine = cfg.open(model)
    start = time.monotonic() - t0
    try:
        budget = cfg.max_model_len - cfg.max_tokens
        convs, index, too_long = [], [], 0
        for k, s in enumerate(pairs.src):
            conv = [{"role": "user", "content": cfg.prompt.replace("{text}", s)}]
            if engine.count_tokens(conv) > budget:
                too_long += 1  # scored as an empty translation: the model could not take it
                continue
            convs.append(conv)
            index.append(k)
        t0 = time.monotonic()
        gens = engine.chat(convs, Sampling(temperature=0.0, max_tokens=cfg.max_tokens)) if convs else []
        seconds = time.monotonic() - t0
        hyps = [""] * len(pairs.src)
        for k, g in zip(index, gens):
            hyps[k] = g.text.strip()
        tokens = sum(g.completion_tokens for g in gens)
        return {
            "hyps": hyps,
            "engine": engine.info(),
            "engine_start_seconds": round(start, 3),
            "generate_seconds": round(seconds, 3),
            "completion_tokens": tokens,
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "too_long": too_long,
            "cut_at_max_tokens": sum(not g.finished for g in gens),
        }
    finally:
        engine.close()


def score(hyps: list[str], refs: list[str], tokenize: str) -> dict[str, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(tokenize=tokenize), CHRF(word_order=2)
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {
        "bleu": round(b.score, 2),
        "chrf++": round(c.score, 2),
        "signatures": {"bleu": str(bleu.get_signature()), "chrf++": str(chrf.get_signature())},
    }
