"""Training data: stored rows -> checked examples -> tokenized (labels masked) -> mixture, eval split,
packing.

The result is the tokenized cache: a `datasets` folder per split that SFTTrainer takes with
`skip_prepare_dataset`, so a million-row corpus is tokenized once, not on every run, every resume or
every rank, and the three LFM2 Hala models (one tokenizer) share it.

Accounting is per stored row: a row is trained on, quarantined (with the reason), or left out by a
mixture weight below 1. A pair can give several examples (directions, the masked form); the row counts
once, and as quarantined only when none of its examples survives.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hala.contract import spans
from hala.contract.errors import DataError
from stages.train.config import TrainConfig

ROLES = {"system", "user", "assistant", "tool"}


class Examples:
    """Examples of every data input and the rows that gave none. Examples go to an Arrow file as they are
    made, a batch at a time (memory follows the batch, not the corpus); `dataset()` maps it back,
    memory-mapped."""

    BATCH = 4096

    def __init__(self, folder: str | None = None):
        self.folder = folder or tempfile.mkdtemp(prefix="hala-examples-")
        self.rows_in: dict[str, int] = {}
        self.quarantine: list[dict[str, Any]] = []
        self.augmented = 0  # masked forms added (span_markers)
        self.count = 0
        self._buffer: list[dict[str, Any]] = []
        self._writer: Any = None
        self._dataset: Any = None

    def reject(self, name: str, row: int, rid: str, reason: str, detail: str, raw: Any) -> None:
        self.quarantine.append(
            {
                "id": rid,
                "origin": name,
                "row_index": row,
                "reason": reason,
                "detail": detail,
                "raw": json.dumps(raw, ensure_ascii=False, default=str)[:4000],
            }
        )

    def add(self, name: str, row: int, rid: str, example: dict[str, Any]) -> None:
        self._buffer.append(
            {"input": name, "row": row, "id": rid, "example": json.dumps(example, ensure_ascii=False)}
        )
        self.count += 1
        if len(self._buffer) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._writer is None:
            self._writer = pa.ipc.new_stream(os.path.join(self.folder, "examples.arrow"), EXAMPLE_SCHEMA())
        if self._buffer:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._buffer, schema=EXAMPLE_SCHEMA()))
            self._buffer = []

    def dataset(self) -> Any:
        """Every example, as a `datasets.Dataset` memory-mapped from the Arrow file (input, row, id,
        example)."""
        if self._dataset is None:
            from datasets import Dataset

            self._flush()
            self._writer.close()
            self._dataset = Dataset.from_file(os.path.join(self.folder, "examples.arrow"))
        return self._dataset


def EXAMPLE_SCHEMA() -> Any:  # noqa: N802 - a constant built on demand (pyarrow is imported inside)
    import pyarrow as pa

    return pa.schema(
        [("input", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("example", pa.string())]
    )


def kind_of(columns: list[str]) -> str | None:
    if {"src", "tgt"} <= set(columns):
        return "pairs"
    if "messages" in columns:
        return "conversations"
    return None


def add_pairs(out: Examples, name: str, rows: Iterable[dict[str, Any]], cfg: TrainConfig) -> None:
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
                out.add(
                    name,
                    i,
                    rid,
                    {
                        "prompt": [{"role": "user", "content": prompts[direction].replace("{text}", a)}],
                        "completion": [{"role": "assistant", "content": b}],
                    },
                )
            made += 1
        if not made:
            out.reject(
                name,
                i,
                rid,
                "unsupported_direction",
                f"pair is {stored}; the step trains {', '.join(cfg.directions)}",
                r,
            )


def add_conversations(out: Examples, name: str, rows: Iterable[dict[str, Any]]) -> None:
    for i, r in enumerate(rows):
        rid = str(r.get("id") or f"{name}:{i}")
        messages, problem = [], None
        for j, m in enumerate(r.get("messages") or []):
            role, content, calls = m.get("role"), m.get("content") or "", m.get("tool_calls") or None
            if role not in ROLES:
                problem = (
                    "unknown_role",
                    f"message {j} has role {role!r}; expected one of {', '.join(sorted(ROLES))}",
                )
                break
            if not content.strip() and not calls:
                problem = ("empty_turn", f"message {j} ({role}) is empty")
                break
            msg: dict[str, Any] = {"role": role, "content": content}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        if problem is None and not any(m["role"] == "assistant" for m in messages):
            problem = (
                "no_assistant_turn",
                f"{len(messages)} messages, none from the assistant: nothing to learn",
            )
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
        prompt = tok.apply_chat_template(
            ex["prompt"], chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        ids = tok.apply_chat_template(
            ex["prompt"] + ex["completion"], chat_template=template, tokenize=True, return_dict=True
        )["input_ids"]
        # where the two diverge, not len(prompt): some templates render a prompt alone differently
        n = _prefix(prompt, ids)
        labels = [-100] * n + ids[n:]
    else:
        enc = tok.apply_chat_template(
            ex["messages"],
            tools=ex.get("tools"),
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = enc["input_ids"]
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
    return {"input_ids": ids, "labels": labels, "length": len(ids), "targets": sum(x != -100 for x in labels)}


@dataclass
class Prepared:
    train: Any
    eval: Any | None
    quarantine: list[dict[str, Any]]
    stats: dict[str, Any]


def prepare(
    examples: Examples,
    tok: Any,
    template: str | None,
    cfg: TrainConfig,
    max_length: int | None,
    truncation_mode: str,
    packing: bool,
    packing_strategy: str,
    workers: int | None,
    shuffle: bool = False,
) -> Prepared:
    """Tokenize every example once, apply too_long, the mixture and the eval split, then pack.

    `shuffle` is SFTConfig's shuffle_dataset, as TRL applies it: before packing (so that packed rows mix
    sources). Without it the rows stay in input order and the Trainer's seeded sampler alone orders the
    batches, exactly as it would for a bare SFTTrainer given the same rows.

    The bookkeeping is columnar: lengths, targets and row keys are numpy arrays read from the memory-mapped
    tokenized table, and the eval split and mixture are index operations, so memory grows by bytes per
    example, not by Python objects per row. The draws are the same `random.Random(seed)` calls on the same row
    orders as before, so a corpus gives the same split and mixture.
    """
    import numpy as np
    from trl import pack_dataset

    if examples.count == 0:  # every input empty, or every row refused before tokenizing
        reasons = Counter(q["reason"] for q in examples.quarantine)
        raise DataError(
            f"no example to train on: the data inputs hold {examples.rows_in or 'no input'} rows, and "
            f"{dict(reasons) or 'none'} were refused; give the step rows (an upstream step that quarantined "
            "every row, or a judge that accepted none, leaves it nothing)"
        )
    raw = examples.dataset()
    ds = raw.map(
        tokenize,
        fn_kwargs={"tok": tok, "template": template, "task": cfg.task},
        num_proc=workers,
        remove_columns=["example"],
        desc="tokenizing",
    )
    table = ds.data
    lengths = table.column("length").to_numpy()
    targets = table.column("targets").to_numpy()
    rows = table.column("row").to_numpy().astype(np.int64)
    encoded = table.column("input").combine_chunks().dictionary_encode()
    input_names = encoded.dictionary.to_pylist()
    keys = (
        encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) << 40
    ) | rows  # one int per (input, row)

    def name_row(key: int) -> tuple[str, int]:
        return input_names[key >> 40], int(key & ((1 << 40) - 1))

    def quarantined(k: int, reason: str, detail: str, raw_text: str | None = None) -> dict[str, Any]:
        item = raw[int(k)]
        name, row = name_row(int(keys[k]))
        return {
            "id": item["id"],
            "origin": name,
            "row_index": row,
            "reason": reason,
            "detail": detail,
            "raw": item["example"][:4000] if raw_text is None else raw_text,
        }

    usable = targets > 0
    too_long = (lengths > max_length) if max_length is not None else np.zeros(len(lengths), dtype=bool)
    if cfg.too_long == "drop":
        dropped = usable & too_long
        usable &= ~too_long
        truncated = np.zeros(0, dtype=np.int64)
    else:
        dropped = np.zeros(len(lengths), dtype=bool)
        truncated = np.flatnonzero(usable & too_long)
    quarantine = list(examples.quarantine)
    # a row is quarantined when none of its examples (directions, the masked form) is usable: with the reason
    # of its first failing example
    failing = np.flatnonzero(~usable)
    _, first = np.unique(keys[failing], return_index=True)
    first_failures = failing[np.sort(first)]
    for k in first_failures[
        ~np.isin(keys[first_failures], keys[usable])
    ]:  # rows with no usable example at all
        if targets[k] == 0:
            quarantine.append(quarantined(k, "no_target_tokens", "the template marked no token for the loss"))
        else:
            quarantine.append(
                quarantined(
                    k, "too_long", f"{lengths[k]} tokens > trainer.max_length {max_length} (too_long: drop)"
                )
            )

    if max_length is not None and len(truncated):
        sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        ds = ds.map(
            lambda x: {"input_ids": x["input_ids"][sl], "labels": x["labels"][sl]},
            num_proc=workers,
            desc="truncating",
        )
        # a prompt that fills max_length leaves nothing to learn: such rows join the quarantine
        # usable examples of those rows
        left = Counter(keys[usable][np.isin(keys[usable], keys[truncated])].tolist())
        for k in truncated:
            if any(t != -100 for t in ds[int(k)]["labels"]):
                continue
            usable[k] = False
            left[int(keys[k])] -= 1
            if left[int(keys[k])] == 0:
                quarantine.append(
                    quarantined(k, "too_long", f"no target token within the first {max_length} tokens", "")
                )

    # usable examples grouped by row key, in example order within a row
    u = np.flatnonzero(usable)
    order = np.argsort(keys[u], kind="stable")
    u_sorted, uk_sorted = u[order], keys[u][order]
    row_keys = np.unique(uk_sorted)

    def examples_of(chosen: np.ndarray) -> np.ndarray:
        """The usable example indices of each chosen row key, in the order of the keys (repeats kept)."""
        starts = np.searchsorted(uk_sorted, chosen, "left")
        counts = np.searchsorted(uk_sorted, chosen, "right") - starts
        if not counts.sum():
            return np.zeros(0, dtype=np.int64)
        shift = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        return u_sorted[shift + np.arange(counts.sum())]

    rng = random.Random(cfg.seed)
    by_input: dict[str, list[int]] = {}
    for code in sorted(
        range(len(input_names)), key=lambda c: input_names[c]
    ):  # inputs by name, rows ascending
        mine = row_keys[(row_keys >> 40) == code]
        if len(mine):
            by_input[input_names[code]] = mine.tolist()
    eval_rows: list[int] = []
    if cfg.eval_fraction > 0:  # held out before weighting, so no row is in both splits
        for name, rk in by_input.items():
            n = max(1, round(len(rk) * cfg.eval_fraction)) if len(rk) > 1 else 0
            held = set(rng.sample(range(len(rk)), n))
            eval_rows += [rk[i] for i in sorted(held)]
            by_input[name] = [key for i, key in enumerate(rk) if i not in held]
    weights = cfg.mixture or {}
    chosen_all: list[int] = []
    mixed: dict[str, int] = {}
    sampled_out = 0
    for name, rk in by_input.items():
        w = weights.get(name, 1.0)
        whole, frac = int(w), w - int(w)
        chosen = rk * whole + rng.sample(rk, round(len(rk) * frac))
        if w < 1:
            sampled_out += len(rk) - len(chosen)
        mixed[name] = len(chosen)
        chosen_all += chosen
    train_idx = examples_of(np.asarray(chosen_all, dtype=np.int64))
    train = ds.select(train_idx)
    if shuffle:
        train = train.shuffle(seed=cfg.seed)
    eval_idx = examples_of(np.asarray(eval_rows, dtype=np.int64))
    eval_ds = ds.select(eval_idx) if eval_rows else None
    train_lengths = lengths[train_idx]
    train_tokens = int(
        train_lengths.sum() if max_length is None else np.minimum(train_lengths, max_length).sum()
    )
    keep = ["input_ids", "labels"]
    train = train.select_columns(keep)
    eval_ds = eval_ds.select_columns(keep) if eval_ds is not None else None
    if packing:
        if max_length is None:
            raise ValueError("trainer.packing needs trainer.max_length")
        train = pack_dataset(train, max_length, packing_strategy, {"num_proc": workers})
        if eval_ds is not None:
            eval_ds = pack_dataset(eval_ds, max_length, packing_strategy, {"num_proc": workers})
    stats = {
        "rows_in": examples.rows_in,
        "rows_used": len(row_keys) - sampled_out,
        "rows_sampled_out": sampled_out,
        "rows_eval": len(eval_rows),
        "rows_per_input_after_mixture": mixed,
        "examples": len(ds),
        "examples_augmented": examples.augmented,
        "examples_train": len(train_idx),
        "examples_truncated": len(truncated),
        "examples_dropped_too_long": int(dropped.sum()),
        "sequences_train": len(train),
        "sequences_eval": len(eval_ds) if eval_ds is not None else 0,
        "tokens_train": train_tokens,
        "packing": packing,
        "quarantine_by_reason": dict(Counter(q["reason"] for q in quarantine)),
    }
    return Prepared(train, eval_ds, quarantine, stats)
