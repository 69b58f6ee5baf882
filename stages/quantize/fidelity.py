"""Measure, do not assume: the source and the quantized checkpoint on the same sample chats.

Scored are the assistant tokens (the reference translation): perplexity of each model, mean and max
|logit difference|, and the share of positions where both pick the same top token. The quantized model
is the saved checkpoint, reloaded the way every consumer loads it.

`sequential` never holds both models: the source runs first and its logits at the scored positions go
to a memory-mapped file on disk; then it is freed and the quantized model runs. With device_map="auto"
each model may itself be larger than the GPU (accelerate offloads layers to CPU and disk).
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hala.contract import logs
from hala.contract.errors import DataError


@dataclass
class Scored:
    ids: torch.Tensor  # [1, T] token ids
    # indices of the scored tokens (the last assistant turn); logits at targets-1 predict them
    targets: torch.Tensor


def _assistant_targets(tok: Any, chat: list[dict[str, str]], full: list[int]) -> list[int]:
    """The last assistant turn's tokens: from the template's {% generation %} mask when it has one, else
    everything after the prompt rendered with add_generation_prompt (ChatML-like templates)."""
    try:
        enc = tok.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        mask = list(enc["assistant_masks"])
    except (ValueError, KeyError, TypeError):
        mask = []
    if any(mask):
        spans: list[list[int]] = []
        for i, m in enumerate(mask):
            if m and (not spans or spans[-1][-1] != i - 1):
                spans.append([])
            if m:
                spans[-1].append(i)
        return spans[-1]
    prompt = list(
        tok.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    start = len(prompt) if full[: len(prompt)] == prompt else 1
    return list(range(start, len(full)))


def encode(tok: Any, chats: list[list[dict[str, str]]], max_len: int) -> list[Scored]:
    """Token ids of each chat and the positions of its last assistant turn."""
    out = []
    for chat in chats:
        full = list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        targets = [t for t in _assistant_targets(tok, chat, full) if 0 < t < max_len]
        if targets:
            out.append(Scored(torch.tensor([full[: max(targets) + 1]]), torch.tensor(targets)))
    if not out:
        raise DataError("fidelity check: no sample row has an assistant turn within max_seq_length tokens")
    return out


def _logits(model: Any, item: Scored) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=item.ids.to(model.device)).logits[0]
        return logits[item.targets.to(logits.device) - 1].float().cpu()


def _nll(logits: torch.Tensor, item: Scored) -> float:
    return float(torch.nn.functional.cross_entropy(logits, item.ids[0, item.targets], reduction="sum"))


@dataclass
class _Tally:
    """Running sums over the scored positions of every item."""

    nll_s: float = 0.0
    nll_q: float = 0.0
    abs_sum: float = 0.0
    abs_max: float = 0.0
    agree: int = 0

    def add(self, ls: torch.Tensor, lq: torch.Tensor, item: Scored) -> None:
        self.nll_s += _nll(ls, item)
        self.nll_q += _nll(lq, item)
        diff = (ls - lq).abs()
        self.abs_sum += float(diff.sum()) / ls.shape[-1]
        self.abs_max = max(self.abs_max, float(diff.max()))
        self.agree += int((ls.argmax(-1) == lq.argmax(-1)).sum())


def compare(load_source: Any, load_quantized: Any, items: list[Scored], mode: str) -> dict[str, Any]:
    """Run both models over the items; `load_*` are callables so that `sequential` can free the first."""
    log = logs.get("stages.quantize")
    n_tokens = sum(len(i.targets) for i in items)
    tally = _Tally()
    if mode == "together":
        source, quantized = load_source(), load_quantized()
        for item in items:
            tally.add(_logits(source, item), _logits(quantized, item), item)
        del source, quantized
    else:
        with tempfile.TemporaryDirectory(prefix="hala-fidelity-") as tmp:
            source = load_source()
            kept: Any = None
            offsets = []
            pos = 0
            for item in items:
                ls = _logits(source, item)
                if kept is None:
                    kept = np.lib.format.open_memmap(
                        os.path.join(tmp, "source-logits.npy"),
                        mode="w+",
                        dtype=np.float32,
                        shape=(n_tokens, ls.shape[-1]),
                    )
                kept[pos : pos + ls.shape[0]] = ls.numpy()
                offsets.append(pos)
                pos += ls.shape[0]
            del source
            gc.collect()
            log.info("fidelity: source done, its logits on disk", tokens=n_tokens, vocab=kept.shape[1])
            quantized = load_quantized()
            for item, off in zip(items, offsets):
                lq = _logits(quantized, item)
                tally.add(torch.from_numpy(np.asarray(kept[off : off + lq.shape[0]])), lq, item)
            del quantized, kept
    gc.collect()
    ppl_s, ppl_q = math.exp(tally.nll_s / n_tokens), math.exp(tally.nll_q / n_tokens)
    return {
        "mode": mode,
        "rows": len(items),
        "tokens": n_tokens,
        "ppl_source": round(ppl_s, 6),
        "ppl_quantized": round(ppl_q, 6),
        "ppl_increase": round(ppl_q / ppl_s - 1, 6),
        "mean_abs_logit_diff": round(tally.abs_sum / n_tokens, 6),
        "max_abs_logit_diff": round(tally.abs_max, 6),
        "argmax_agreement": round(tally.agree / n_tokens, 6),
    }


def verdict(
    report: dict[str, Any], max_ppl_increase: float, min_argmax_agreement: float | None
) -> str | None:
    """None when the quantized model is acceptable, else why not."""
    if not math.isfinite(report["ppl_quantized"]):
        return "the quantized model's perplexity is not finite"
    if report["ppl_increase"] > max_ppl_increase:
        return (
            f"perplexity rose {report['ppl_increase']:.2%} ({report['ppl_source']:.4f} -> "
            f"{report['ppl_quantized']:.4f}), "
            f"more than max_ppl_increase {max_ppl_increase:.2%}"
        )
    if min_argmax_agreement is not None and report["argmax_agreement"] < min_argmax_agreement:
        return (
            f"top-token agreement {report['argmax_agreement']:.2%} is under min_argmax_agreement "
            f"{min_argmax_agreement:.2%}"
        )
    return None
