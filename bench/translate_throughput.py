"""The translate stage's throughput against the raw engine's, same model, same prompts, side by side.

    .venvs/serve/bin/python bench/translate_throughput.py [--rows 2048] [--engines transformers,vllm] \
        [--repeats 3]

The raw side sends exactly the units the stage sends (distinct real English instruction rows, Alpaca then
GSM8K from ../shared/data, planned by the stage's own code: spans protected, split per paragraph) in one call
to the engine; the stage side runs the whole step (read, protect spans, engine, gate, parquet chunks, commit),
and its time excludes the engine's start-up and shutdown, which the raw side does not pay in its timing
either. Throughput is completion tokens per second. Goal (translate issue): stage / raw >= 0.97.

The model is the tiny translator stand-in (LFM2, ~1M parameters): generation is cheap, so the stage's own
overhead weighs more than it would with a real model; the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"
DATA = REPO.parent / "shared" / "data"  # the team's data folder beside the checkout (read, never copied)


def real_conversations() -> list[list[dict]]:
    """Distinct real English instruction rows: Alpaca (5,000) then GSM8K train (7,473), from
    ../shared/data."""
    convs = []
    alpaca = DATA / "en-alpaca-5000" / "alpaca_5000.json"
    if alpaca.exists():
        for row in json.loads(alpaca.read_text(encoding="utf-8")):
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}])
    gsm8k = DATA / "en-gsm8k" / "train.jsonl"
    if gsm8k.exists():
        for line in gsm8k.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            convs.append(
                [
                    {"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["answer"]},
                ]
            )
    return convs


def sample_conversations() -> list[list[dict]]:
    """The repository's small samples (a few dozen rows): only when ../shared/data is absent."""
    base = []
    for name in ("tulu3", "lamini", "dahoas", "realign-alpaca"):
        for line in (REPO / "recipes" / "samples" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "messages" in row:
                msgs = row["messages"]
            elif "instruction" in row and "output" in row:
                msgs = [
                    {
                        "role": "user",
                        "content": row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else ""),
                    },
                    {"role": "assistant", "content": row["output"]},
                ]
            elif "response" in row:
                msgs = [
                    {"role": "user", "content": row["instruction"]},
                    {"role": "assistant", "content": row["response"]},
                ]
            elif "chosen" in row:
                msgs = [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["chosen"]},
                ]
            else:
                continue
            if any(m.get("role") not in ("system", "user", "assistant", "tool") for m in msgs):
                continue
            base.append(msgs)
    return base


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def dataset(folder: Path, n: int) -> list[dict]:
    from hala.contract import tables

    # Distinct rows matter: with a few dozen rows repeated, the raw call (sorted by length over everything)
    # batches identical prompts, which also finish at the same step; chunks see fewer copies of each.
    base = real_conversations() or sample_conversations()
    if len(base) < n:
        print(f"note: {len(base)} distinct conversations for {n} rows: rows repeat", file=sys.stderr)
    rows = [
        {
            "id": f"b:{i}",
            "origin": "bench",
            "tools": None,
            "messages": [
                {"role": m["role"], "content": m.get("content") or "", "tool_calls": m.get("tool_calls")}
                for m in base[i % len(base)]
            ],
        }
        for i in range(n)
    ]
    tables.write(str(folder / "part-0.parquet"), rows, tables.conversations_schema())
    return rows


def run(kind: str, n: int, work: Path, chunk_rows: int) -> dict:
    from hala.contract import recipe as recipe_mod
    from hala.contract import step, tiny
    from hala.contract.store import Store
    from hala.kit.engine import Sampling, open_engine
    from stages.translate.config import TranslateConfig
    from stages.translate.main import main as translate_main
    from stages.translate.main import plan_chunk

    data = work / "data"
    rows = dataset(data, n)
    recipe_path = work / "recipe.yaml"
    import yaml

    recipe_path.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "store": str(work / "store"),
                "run": kind,
                "tiny_models": {"pairs": str(PAIRS)},
                "steps": {
                    "translate-x": {
                        "stage": "translate",
                        "inputs": {"data": str(data), "model": "tiny:translator"},
                        "config": {
                            "engine": kind,
                            "unit": "paragraph",
                            "max_model_len": 512,
                            "sampling": {"max_tokens": 128},
                            "chunk_rows": chunk_rows,
                        },
                    }
                },
            }
        )
    )
    recipe = recipe_mod.load(recipe_path)
    model = tiny.ensure(Store(recipe.store), "translator", recipe)
    cfg = TranslateConfig.model_validate(recipe.steps["translate-x"].config)
    sampling = Sampling(max_tokens=128)

    # raw: the same units, one engine call
    engine = open_engine(model, kind, max_model_len=512)
    # the stage's own planning (spans protected, paragraphs too long for the context split): the same prompts
    _, units = plan_chunk(engine, 0, list(enumerate(rows)), cfg, cfg.max_model_len - sampling.max_tokens)
    # no warm-up call: the stage's first chunk gets none either
    t0, c0 = time.perf_counter(), cpu_seconds()
    gens = engine.chat(units, sampling)
    raw_s, raw_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    raw_tokens = sum(g.completion_tokens for g in gens)
    engine.close()
    del engine

    # the stage, whole
    t0, c0 = time.perf_counter(), cpu_seconds()
    code = step.run(
        "translate",
        TranslateConfig,
        translate_main,
        argv=["--recipe", str(recipe_path), "--step", "translate-x", "--force"],
    )
    stage_s, stage_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if code:
        sys.exit(f"the translate step failed with exit {code}")
    m = Store(str(work / "store")).read_manifest(kind, "translate-x")
    # the engine's start and shutdown are fixed costs per shard that the raw side does not pay in its timing
    stage_busy = stage_s - m["timings"]["engine_start_seconds"] - m["timings"]["engine_close_seconds"]
    stage_tokens = m["metrics"]["completion_tokens"]
    print(
        json.dumps(
            {
                "engine": kind,
                "stage_wall_s": round(stage_s, 2),
                "engine_start_s": m["timings"]["engine_start_seconds"],
                "engine_close_s": m["timings"]["engine_close_seconds"],
                "raw_s": round(raw_s, 2),
                # CPU seconds of this process (all its threads; not vLLM's engine core, its own process): on a
                # machine where the engine uses every core, what the stage spends here it takes from the
                # engine
                "raw_main_cpu_s": round(raw_cpu, 2),
                "stage_main_cpu_s": round(stage_cpu, 2),
            }
        ),
        flush=True,
    )
    return {
        "engine": kind,
        "rows": n,
        "units": len(units),
        "raw_tokens": raw_tokens,
        "raw_tok_s": round(raw_tokens / raw_s, 1),
        "stage_tokens": stage_tokens,
        "stage_tok_s": round(stage_tokens / stage_busy, 1),
        "ratio": round((stage_tokens / stage_busy) / (raw_tokens / raw_s), 3),
        "stage_rows_out": m["counts"]["rows_out"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--chunk-rows", type=int, default=512)
    p.add_argument("--engines", default="transformers,vllm")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="pairs of runs per engine; the median ratio is the figure "
        "(a shared 2-core machine moves single runs by +-5%%)",
    )
    args = p.parse_args()
    os.environ.setdefault("HALA_LOG_FORMAT", "json")
    results = []
    for kind in args.engines.split(","):
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix=f"hala-bench-{kind}-") as tmp:
                results.append(run(kind, args.rows, Path(tmp), args.chunk_rows))
    print("\nengine        rows  units  raw tok/s  stage tok/s  stage/raw")
    for r in results:
        print(
            f"{r['engine']:12} {r['rows']:5} {r['units']:6} {r['raw_tok_s']:10} {r['stage_tok_s']:12} "
            f"{r['ratio']:10}"
        )
    for kind in args.engines.split(","):
        ratios = [r["ratio"] for r in results if r["engine"] == kind]
        print(
            f"{kind}: median stage/raw {statistics.median(ratios):.3f} over {len(ratios)} (min "
            f"{min(ratios):.3f}, max {max(ratios):.3f})"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
