"""train, tokenized data: the step's rows checked, mixed and tokenized once into a content-addressed artifact
of the store, keyed by everything the tokens depend on (inputs, the data settings, the tokenizer and template,
TRL's version and data.py) and nothing about the weights or the optimizer; every rank and every later step
with the same key reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from hala.contract import artifact, tables
from hala.contract.errors import DataError
from hala.contract.hashing import sha256_json
from hala.contract.step import StepContext
from hala.contract.store import Identity, describe_local, new_manifest, now, output_entry
from stages.train import data
from stages.train.config import TrainConfig
from stages.train.setup import tokenizer_fingerprint

CACHE_RUN = "_cache"  # <store>/_cache/tokenized-<key>/: shared by every run and step of the store
# SFTConfig's fields that shape the tokenized data (their effective values, defaults included)
SFT_DATA_FIELDS = ("max_length", "packing", "packing_strategy", "truncation_mode", "shuffle_dataset")


def read_examples(cfg: TrainConfig, ctx: StepContext) -> data.Examples:
    names = [n for n in ctx.inputs if n != "model"]
    out = data.Examples()
    for name in names:
        path = ctx.input(
            name
        ).local_path()  # every file checked against its manifest (and local: read it twice)
        reader = tables.RowGroups.local(path)
        columns = reader.columns
        kind = data.kind_of(columns)
        if kind != cfg.task:
            raise DataError(
                f"step '{ctx.step.name}': input '{name}' ({ctx.input(name).ref.raw}) holds "
                f"{kind or 'neither pairs nor conversations'} (columns {', '.join(columns) or 'none'}), "
                f"task is {cfg.task}"
            )
        out.rows_in[name] = reader.total
        # a batch of rows at a time, never the whole input
        rows = (row for _, row in reader.rows(0, reader.total))
        if kind == "pairs":
            data.add_pairs(out, name, rows, cfg)
        else:
            data.add_conversations(out, name, rows)
    return out


def cache_key(cfg: TrainConfig, ctx: StepContext, tok_fp: str, sft: dict[str, Any]) -> str:
    """Everything the tokenized data depends on, and nothing about the model's weights or the optimizer."""
    import trl

    here = os.path.dirname(__file__)
    with open(os.path.join(here, "data.py"), "rb") as f:
        code = f.read().decode()
    return sha256_json(
        {
            "inputs": {n: r.key for n, r in ctx.inputs.items() if n != "model"},
            "config": cfg.model_dump(
                include={
                    "task",
                    "prompt",
                    "directions",
                    "span_markers",
                    "mixture",
                    "too_long",
                    "eval_fraction",
                    "seed",
                }
            ),
            "tokenizer": tok_fp,
            "sft": {k: sft.get(k) for k in SFT_DATA_FIELDS},
            "trl": trl.__version__,
            "code": code,
        }
    )


def ensure(
    cfg: TrainConfig, ctx: StepContext, tok: Any, template: str, sft: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Local folder of the tokenized cache (train/, eval/, quarantine.parquet, stats.json), built if missing:
    a content-addressed artifact of the store (hala.contract.artifact), so two steps or pods with one cache
    key build it once."""
    from accelerate import PartialState

    key = cache_key(cfg, ctx, tokenizer_fingerprint(tok, template), sft)
    name = f"tokenized-{key[:20]}"

    def build(folder: str) -> dict[str, Any]:
        t0 = time.monotonic()
        examples = read_examples(cfg, ctx)
        try:
            prepared = data.prepare(
                examples,
                tok,
                template,
                cfg,
                sft.get("max_length"),
                sft.get("truncation_mode", "keep_start"),
                bool(sft.get("packing")),
                sft.get("packing_strategy", "bfd"),
                cfg.tokenize_workers,
                bool(sft.get("shuffle_dataset")),
            )
            return cache_manifest(ctx, folder, name, key, prepared, time.monotonic() - t0)
        finally:
            shutil.rmtree(examples.folder, ignore_errors=True)  # the examples and datasets' map caches

    with PartialState().main_process_first():  # rank 0 builds; the others wait, then read what it committed
        manifest, hit = artifact.ensure(ctx.store, CACHE_RUN, name, key, build, ctx.log)
        path = ctx.store.localize(CACHE_RUN, name, manifest, "data")
    ctx.log.info(
        "tokenized data",
        cache=name,
        hit=hit,
        **{k: manifest["metrics"][k] for k in ("sequences_train", "tokens_train")},
    )
    return path, {"cache": f"{CACHE_RUN}/{name}", "hit": hit, **manifest["metrics"]}


def cache_manifest(
    ctx: StepContext, folder: str, name: str, key: str, prepared: data.Prepared, seconds: float
) -> dict[str, Any]:
    """The tokenized data under folder/data, and its manifest."""
    import pyarrow as pa

    started = now()
    out = os.path.join(folder, "data")
    prepared.train.save_to_disk(os.path.join(out, "train"))
    if prepared.eval is not None:
        prepared.eval.save_to_disk(os.path.join(out, "eval"))
    tables.write(os.path.join(out, "quarantine.parquet"), prepared.quarantine, tables.quarantine_schema())
    stats = {**prepared.stats, "seconds": round(seconds, 3)}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    files = describe_local(folder, "data")
    return new_manifest(
        run=CACHE_RUN,
        step=Identity(
            name,
            "train.tokenize",
            ctx.step.spec.version if ctx.step.spec else None,
            {"made_by": ctx.step.name},
            key,
        ),
        fingerprint=key,
        inputs={n: r.record() for n, r in ctx.inputs.items() if n != "model"},
        outputs={
            "data": output_entry(
                files, "data", "dataset", stats["sequences_train"], format="arrow", pyarrow=pa.__version__
            )
        },
        counts=None,
        quarantine={"rows": len(prepared.quarantine), "by_reason": stats["quarantine_by_reason"]},
        metrics=stats,
        timings={"started": started, "finished": now(), "seconds": round(seconds, 3)},
        shards=None,
    )
