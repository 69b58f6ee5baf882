"""Training data: stored rows -> checked examples -> tokenized (labels masked) -> mixture, eval split, packing.

The result is the tokenized cache: a `datasets` folder per split that SFTTrainer takes with
`skip_prepare_dataset`, so a million-row corpus is tokenized once, not on every run, every resume or
every rank, and the three LFM2 Hala models (one tokenizer) share it.

Accounting is per stored row: a row is trained on, quarantined (with the reason), or left out by a
mixture weight below 1. A pair can give several examples (directions, the masked form); the row counts
once, and as quarantined only when none of its examples survives.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from hala import spans
from stages.train.config import TrainConfig

ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Examples:
    """Examples of every data input, and the rows that gave none."""

    rows_in: dict[str, int] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)  # {"input", "row", "id", "example" (JSON)}
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    augmented: int = 0  # masked forms added (span_markers)

    def reject(self, name: str, row: int, rid: str, reason: str, detail: str, raw: Any) -> None:
        self.quarantine.append({"id": rid, "origin": name, "row_index": row, "reason": reason, "detail": detail,
                                "raw": json.dumps(raw, ensure_ascii=False, default=str)[:4000]})

    def add(self, name: str, row: int, rid: str, example: dict[str, Any]) -> None:
        self.items.append({"input": name, "row": row, "id": rid, "example": json.dumps(example, ensure_ascii=False)})


def kind_of(columns: list[str]) -> str | None:
    if {"src", "tgt"} <= set(columns):
        return "pairs"
    if "messages" in columns:
        return "conversations"
    return None


def add_pairs(out: Examples, name: str, rows: list[dict[str, Any]], cfg: TrainConfig) -> None:
    prompts = cfg.prompts()
    for i, r in enumerate(rows):
        rid = str(r.get("id") or f"{name}:{i}")
        src, tgt = (r.get("src") or "").strip(), (r.get("tgt") or "").strip()
        if not src or not tgt:
            out.reject(name, i, rid, "empty_pair", f"{'src' if not src else 'tgt'} is empty", r)
            continue
        stored = f"{r.get('src_lang')}-{r.get('tgt_lang')}"
        made = 0
        for direction in cfg.directions:
            if direction == stored:
                s, t = src, tgt
            elif direction == f"{r.get('tgt_lang')}-{r.get('src_lang')}":
                s, t = tgt, src
            else:
                continue
            forms = [(s, t)]
            if cfg.span_markers:
                ms, ss, _ = spans.protect(s)
                mt, st, _ = spans.protect(t)
                if ss and ss == st:  # the same protected spans on both sides: learn to carry the markers
                    forms.append((ms, mt))
                    out.augmented += 1
            for a, b in forms:
                # replace, not format: the prompt may hold other braces (JSON examples, LaTeX)
                out.add(name, i, rid, {"prompt": [{"role": "user", "content": prompts[direction].replace("{text}", a)}],
                                       "completion": [{"role": "assistant", "content": b}]})
            made += 1
        if not made:
            out.reject(name, i, rid, "unsupported_direction", f"pair is {stored}; the step trains {', '.join(cfg.directions)}", r)


def add_conversations(out: Examples, name: str, rows: list[dict[str, Any]]) -> None:
    for i, r in enumerate(rows):
        rid = str(r.get("id") or f"{name}:{i}")
        messages, problem = [], None
        for j, m in enumerate(r.get("messages") or []):
            role, content, calls = m.get("role"), m.get("content") or "", m.get("tool_calls") or None
            if role not in ROLES:
                problem = ("unknown_role", f"message {j} has role {role!r}; expected one of {', '.join(sorted(ROLES))}")
                break
            if not content.strip() and not calls:
                problem = ("empty_turn", f"message {j} ({role}) is empty")
                break
            msg: dict[str, Any] = {"role": role, "content": content}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        if problem is None and not any(m["role"] == "assistant" for m in messages):
            problem = ("no_assistant_turn", f"{len(messages)} messages, none from the assistant: nothing to learn")
        if problem:
            out.reject(name, i, rid, problem[0], problem[1], r)
            continue
        example: dict[str, Any] = {"messages": messages}
        if r.get("tools"):
            example["tools"] = json.loads(r["tools"]) if isinstance(r["tools"], str) else r["tools"]
        out.add(name, i, rid, example)


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize(item: dict[str, Any], tok: Any, template: str | None, task: str) -> dict[str, Any]:
    """input_ids and labels (-100 where no loss): the completion of a pair, the assistant turns of a chat."""
    ex = json.loads(item["example"])
    if task == "pairs":
        prompt = tok.apply_chat_template(ex["prompt"], chat_template=template, add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        ids = tok.apply_chat_template(ex["prompt"] + ex["completion"], chat_template=template,
                                      tokenize=True, return_dict=True)["input_ids"]
        # where the two diverge, not len(prompt): some templates render a prompt alone differently
        n = _prefix(prompt, ids)
        labels = [-100] * n + ids[n:]
    else:
        enc = tok.apply_chat_template(ex["messages"], tools=ex.get("tools"), chat_template=template, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids = enc["input_ids"]
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
    return {"input_ids": ids, "labels": labels, "length": len(ids), "targets": sum(x != -100 for x in labels)}


@dataclass
class Prepared:
    train: Any
    eval: Any | None
    quarantine: list[dict[str, Any]]
    stats: dict[str, Any]


def prepare(examples: Examples, tok: Any, template: str | None, cfg: TrainConfig, max_length: int | None,
            truncation_mode: str, packing: bool, packing_strategy: str, workers: int | None, shuffle: bool = False) -> Prepared:
    """Tokenize every example once, apply too_long, the mixture and the eval split, then pack.

    `shuffle` is SFTConfig's shuffle_dataset, as TRL applies it: before packing (so that packed rows mix
    sources). Without it the rows stay in input order and the Trainer's seeded sampler alone orders the
    batches, exactly as it would for a bare SFTTrainer given the same rows.
    """
    from datasets import Dataset
    from trl import pack_dataset

    ds = Dataset.from_list(examples.items)
    ds = ds.map(tokenize, fn_kwargs={"tok": tok, "template": template, "task": cfg.task}, num_proc=workers,
                remove_columns=["example"], desc="tokenizing")
    lengths, targets = ds["length"], ds["targets"]
    inputs, rows = ds["input"], ds["row"]

    ok: dict[tuple[str, int], list[int]] = defaultdict(list)  # row -> indices of its usable examples
    failed: dict[tuple[str, int], tuple[str, str, int]] = {}
    truncated: list[int] = []
    dropped_examples = 0
    for k in range(len(ds)):
        key = (inputs[k], rows[k])
        if targets[k] == 0:
            failed.setdefault(key, ("no_target_tokens", "the template marked no token for the loss", k))
            continue
        if max_length is not None and lengths[k] > max_length:
            if cfg.too_long == "drop":
                failed.setdefault(key, ("too_long", f"{lengths[k]} tokens > trainer.max_length {max_length} (too_long: drop)", k))
                dropped_examples += 1
                continue
            truncated.append(k)
        ok[key].append(k)
    quarantine = list(examples.quarantine)
    for key, (reason, detail, k) in failed.items():
        if key in ok:
            continue  # another example of the row (a direction, the plain form) is usable
        quarantine.append({"id": ds[k]["id"], "origin": key[0], "row_index": key[1], "reason": reason, "detail": detail,
                           "raw": examples.items[k]["example"][:4000]})

    if max_length is not None and truncated:
        sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        ds = ds.map(lambda x: {"input_ids": x["input_ids"][sl], "labels": x["labels"][sl]}, num_proc=workers, desc="truncating")
        # a prompt that fills max_length leaves nothing to learn: such rows join the quarantine
        for k in truncated:
            if any(t != -100 for t in ds[k]["labels"]):
                continue
            key = (inputs[k], rows[k])
            ok[key].remove(k)
            if not ok[key]:
                del ok[key]
                quarantine.append({"id": ds[k]["id"], "origin": key[0], "row_index": key[1], "reason": "too_long",
                                   "detail": f"no target token within the first {max_length} tokens", "raw": ""})

    rng = random.Random(cfg.seed)
    by_input: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key in sorted(ok):
        by_input[key[0]].append(key)
    eval_rows: list[tuple[str, int]] = []
    if cfg.eval_fraction > 0:  # held out before weighting, so no row is in both splits
        for name, keys in by_input.items():
            n = max(1, round(len(keys) * cfg.eval_fraction)) if len(keys) > 1 else 0
            held = set(rng.sample(range(len(keys)), n))
            eval_rows += [keys[i] for i in sorted(held)]
            by_input[name] = [key for i, key in enumerate(keys) if i not in held]
    weights = cfg.mixture or {}
    train_idx: list[int] = []
    mixed: dict[str, int] = {}
    sampled_out = 0
    for name, keys in by_input.items():
        w = weights.get(name, 1.0)
        whole, frac = int(w), w - int(w)
        chosen = keys * whole + rng.sample(keys, round(len(keys) * frac))
        if w < 1:
            sampled_out += len(keys) - len(chosen)
        mixed[name] = len(chosen)
        train_idx += [k for key in chosen for k in ok[key]]
    train = ds.select(train_idx)
    if shuffle:
        train = train.shuffle(seed=cfg.seed)
    eval_ds = ds.select([k for key in eval_rows for k in ok[key]]) if eval_rows else None
    train_tokens = sum(train["length"]) if max_length is None else sum(min(x, max_length) for x in train["length"])
    keep = ["input_ids", "labels"]
    train = train.select_columns(keep)
    eval_ds = eval_ds.select_columns(keep) if eval_ds is not None else None
    if packing:
        if max_length is None:
            raise ValueError("trainer.packing needs trainer.max_length")
        train = pack_dataset(train, max_length, packing_strategy, {"num_proc": workers})
        if eval_ds is not None:
            eval_ds = pack_dataset(eval_ds, max_length, packing_strategy, {"num_proc": workers})
    used_rows = {key for key in ok}
    stats = {
        "rows_in": examples.rows_in,
        "rows_used": len(used_rows) - sampled_out,
        "rows_sampled_out": sampled_out,
        "rows_eval": len(eval_rows),
        "rows_per_input_after_mixture": mixed,
        "examples": len(ds), "examples_augmented": examples.augmented, "examples_train": len(train_idx),
        "examples_truncated": len(truncated), "examples_dropped_too_long": dropped_examples,
        "sequences_train": len(train), "sequences_eval": len(eval_ds) if eval_ds is not None else 0,
        "tokens_train": train_tokens, "packing": packing,
        "quarantine_by_reason": dict(Counter(q["reason"] for q in quarantine)),
    }
    return Prepared(train, eval_ds, quarantine, stats)
