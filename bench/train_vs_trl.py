"""The train stage's training throughput against a bare TRL script: same model, data, settings and steps.

    .venvs/train/bin/python bench/train_vs_trl.py [--rows 1000] [--steps 60] [--repeats 3]

Data: the first N English->Arabic pairs of NTREX-128 (../shared/data/ntrex128-eng-arb), as prompt/completion
with the translator's prompt. Model: the LFM2-1.2B stand-in (tiny:lfm2-1.2b, built from config).
Each side runs in its own process, alternating, `--repeats` times:

- stage: `python -m stages.train` on a one-step recipe (reads the pairs from parquet, tokenized cache,
  SFTTrainer with our callbacks, checkpoints into the work area, then save, card and the generation check);
- bare: a script that hands the raw prompt/completion dataset to SFTTrainer and calls train().

Both report tokens/s of `trainer.train()` (non-padding input tokens seen / its wall time), the part
that scales with the corpus; preparation, saving and start-up are reported beside it, not in it.
Goal (train issue): stage / bare >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NTREX = REPO.parent / "shared" / "data" / "ntrex128-eng-arb"
PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"
PROMPT = "Translate everything that follows into Arabic:\n\n{text}"


def settings(steps: int) -> dict:
    return {
        "max_steps": steps,
        "learning_rate": 1.0e-3,
        "per_device_train_batch_size": 8,
        "max_length": 256,
        "logging_steps": 10,
        "save_steps": max(steps // 2, 1),
        "lr_scheduler_type": "constant",
        "bf16": False,
        "seed": 42,
    }


def read_ntrex(n: int) -> list[tuple[str, str]]:
    en = (NTREX / "newstest2019-src.eng.txt").read_text(encoding="utf-8").splitlines()
    ar = (NTREX / "newstest2019-ref.arb.txt").read_text(encoding="utf-8").splitlines()
    return [(e.strip(), a.strip()) for e, a in zip(en, ar) if e.strip() and a.strip()][:n]


def bare(model: str, rows: int, steps: int, out: str) -> dict:
    """What a user writes with TRL alone."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": PROMPT.replace("{text}", e)}],
                "completion": [{"role": "assistant", "content": a}],
            }
            for e, a in read_ntrex(rows)
        ]
    )
    args = SFTConfig(
        output_dir=out,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        **settings(steps),
    )
    t0 = time.monotonic()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model)
    )
    prep = time.monotonic() - t0
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "prepare_seconds": prep,
    }


def stage(store: Path, pairs_dir: Path, steps: int, run: str) -> dict:
    from hala.contract.store import Store

    sys.path.insert(0, str(REPO / "tests" / "_lib"))
    from helpers import write_recipe

    recipe = write_recipe(
        store.parent / f"recipe-{run}",
        {
            "train-bench": {
                "stage": "train",
                "inputs": {"model": "tiny:lfm2-1.2b", "pairs": str(pairs_dir)},
                "config": {
                    "task": "pairs",
                    "prompt": PROMPT,
                    "span_markers": False,
                    "trainer": settings(steps),
                },
            }
        },
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "--recipe", str(recipe), "--step", "train-bench"],
        cwd=REPO,
        env={**os.environ, "HALA_PROGRESS_BAR": "0", "HALA_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(f"stage failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = Store(str(store)).read_manifest(run, "train-bench")
    mm = m["metrics"]
    return {
        "tokens": mm["tokens_trained"],
        "train_seconds": m["timings"]["train_seconds"],
        "tokens_per_s": mm["train_tokens_per_second"],
        "step_wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: run the bare side on this model folder
    args = parser.parse_args()
    if args.bare:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(bare(args.bare, args.rows, args.steps, out)))
        return

    from hala.contract import recipe as recipe_mod
    from hala.contract import tables, tiny
    from hala.contract.store import Store

    sys.path.insert(0, str(REPO / "tests" / "_lib"))
    from helpers import write_recipe

    work = Path(tempfile.mkdtemp(prefix="hala-bench-train-"))
    store = work / "store"
    steps = {
        "prepare-x": {"stage": "prepare", "inputs": {"source": str(PAIRS)}, "config": {"format": "pairs"}}
    }
    recipe = recipe_mod.load(
        str(write_recipe(work / "r", steps, store=str(store), tiny_models={"pairs": str(PAIRS)}))
    )
    model = tiny.ensure(Store(str(store)), "lfm2-1.2b", recipe)
    pairs_dir = work / "pairs"
    pairs_dir.mkdir()
    rows = [
        {"id": f"ntrex:{i}", "origin": "ntrex128", "src_lang": "en", "tgt_lang": "ar", "src": e, "tgt": a}
        for i, (e, a) in enumerate(read_ntrex(args.rows))
    ]
    tables.write(str(pairs_dir / "part-0.parquet"), rows, tables.pairs_schema())

    results: dict[str, list[dict]] = {"stage": [], "bare": []}
    for i in range(args.repeats):
        for side in ("stage", "bare") if i % 2 == 0 else ("bare", "stage"):
            if side == "stage":
                r = stage(store, pairs_dir, args.steps, f"bench-{i}")
            else:
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--bare",
                        model,
                        "--rows",
                        str(args.rows),
                        "--steps",
                        str(args.steps),
                    ],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode:
                    raise SystemExit(f"bare TRL failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side].append(r)
            print(
                f"repeat {i} {side:5s}: {r['tokens']} tokens in {r['train_seconds']:.2f} s = "
                f"{r['tokens_per_s']:.0f} tokens/s",
                flush=True,
            )
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    same_tokens = {r["tokens"] for v in results.values() for r in v}
    print(
        json.dumps(
            {
                "rows": args.rows,
                "steps": args.steps,
                "repeats": args.repeats,
                "tokens_per_s_median": med,
                "tokens_per_run": sorted(same_tokens),
                "ratio_stage_over_bare": round(med["stage"] / med["bare"], 3),
                "goal": 0.97,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
