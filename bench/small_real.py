"""A real model through the chain on this machine (recipes/small-real.yaml, issue 33): each step run alone
(`hala run --only STEP`, in a fresh wrapper process), its wall time and peak RSS (the largest process of the
step: the stage; the served model when there is one), then what the real model did: the gate's quarantine
by reason, the judge's acceptance, the loss over the training steps, the merge against MergeKit's slerp of
the same two models (bf16 units in the last place, every element of every tensor), BLEU/chrF++ and the
benchmark scores.

    .venvs/cli/bin/python bench/small_real.py [--store DIR] [--quick] [--out bench/small_real.json]

--quick is the cut CI runs (.ci/run): 4 rows to translate (64 tokens), 8 pairs to judge, 4 training steps,
4 NTREX rows, and neither the vLLM step nor the benchmarks (~160 s of engine start and LightEval here).
The script exits 1 when a step is not committed, the merge differs from MergeKit's by more than one bf16 ulp,
or the loss did not go down (a full run only: four steps of a small batch are noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from scale import timed  # noqa: E402

RECIPE = REPO / "recipes" / "small-real.yaml"
HALA = REPO / ".venvs" / "cli" / "bin" / "hala"
QUICK = [
    "prepare-alpaca.max_rows=4",
    "prepare-flores.max_rows=8",
    "prepare-flores-train.max_rows=8",
    "prepare-ntrex.max_rows=4",
    "train-real.trainer.max_steps=4",
    "train-real.trainer.logging_steps=1",
    "translate-alpaca.sampling.max_tokens=64",  # the model repeats itself to the limit: 64 tokens show it
    # vLLM's CPU start (~90 s) and LightEval (~70 s) are CI time the tiny run and the suites already spend on
    # the same code; make run-real runs both on the real model
    "translate-ntrex-vllm.enabled=false",
    "evaluate-benchmarks.enabled=false",
]

# run with the merge environment's Python (MergeKit is a test dependency there): MergeKit's slerp of the run's
# two models, then the largest distance to ours in bf16 units in the last place
MERGEKIT = """
import json, subprocess, sys, tempfile
from pathlib import Path
import torch, yaml
from safetensors.torch import load_file
ours, base, model, t = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
out = Path(tempfile.mkdtemp()) / "mergekit"
cfg = out.parent / "mergekit.yml"
cfg.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": base, "dtype": "bfloat16",
    "models": [{"model": base}, {"model": model}], "parameters": {"t": t}}))
subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(cfg), str(out)], check=True,
    capture_output=True)
def tensors(folder):
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        found.update(load_file(f))
    return found
def ordered(x):  # bf16 bit patterns on one line: neighbours differ by 1, across zero too
    bits = x.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)
a, b = tensors(ours), tensors(out)
assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
worst = max(int((ordered(a[k]) - ordered(b[k])).abs().max()) for k in a)
differ = sum(int((a[k] != b[k]).sum()) for k in a)
total = sum(v.numel() for v in a.values())
print(json.dumps({"max_ulp": worst, "elements_differing": differ, "elements": total}))
"""


def hala(*args: str) -> Any:
    out = subprocess.run([str(HALA), *args, "--json"], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout)


def manifest(store: Path, run: str, step: str) -> dict[str, Any]:
    return json.loads((store / run / step / "_MANIFEST.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=None, help="default: a new temporary folder")
    p.add_argument("--quick", action="store_true", help="the short cut CI runs")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    store = args.store or Path(tempfile.mkdtemp(prefix="hala-small-real-"))
    sets = [a for s in (QUICK if args.quick else []) for a in ("--set", s)]
    off = {s.split(".")[0] for s in (QUICK if args.quick else []) if s.endswith(".enabled=false")}
    steps = [s["step"] for s in hala("steps", str(RECIPE)) if s["enabled"] and s["step"] not in off]
    run = "small-real"
    env = dict(os.environ)
    rows = []
    print("| step | seconds | peak RSS (MB) | rows |\n| --- | --- | --- | --- |")
    for step in steps:
        seconds, rss = timed(
            [str(HALA), "run", str(RECIPE), "--store", str(store), "--only", step, *sets], env
        )
        m = manifest(store, run, step)
        out = {k: v.get("rows") for k, v in m["outputs"].items()}
        rows.append({"step": step, "seconds": round(seconds, 1), "rss_mb": round(rss), "rows": out})
        print(f"| {step} | {seconds:.1f} | {rss:.0f} | {out} |", flush=True)
    status = {r["step"]: r["state"] for r in hala("status", run, "--store", str(store))}
    failed = [s for s in steps if status.get(s) != "committed"]

    translate = manifest(store, run, "translate-alpaca")
    sentences = manifest(store, run, "translate-ntrex-vllm") if "translate-ntrex-vllm" in steps else None
    judge = manifest(store, run, "judge-flores")
    train = manifest(store, run, "train-real")["metrics"]
    merge = manifest(store, run, "merge-real")
    curve = [(e["step"], round(e["loss"], 4)) for e in train["loss_curve"]["train"]]
    parents = merge["metrics"]["parents"]
    merged = store / run / "merge-real" / merge["outputs"]["model"]["path"]
    train_m = manifest(store, run, "train-real")
    trained = store / run / "train-real" / train_m["outputs"]["model"]["path"]
    source = Path(parents["base"]["uri"])  # <store>/_sources/<name>: the converted model's own manifest
    base = source / json.loads((source / "_MANIFEST.json").read_text())["outputs"]["model"]["path"]
    compared = subprocess.run(
        [
            str(REPO / ".venvs" / "merge" / "bin" / "python"),
            "-c",
            MERGEKIT,
            str(merged),
            str(base),
            str(trained),
            str(merge["metrics"]["plan"]["t"]),
        ],
        capture_output=True,
        text=True,
    )
    if compared.returncode:
        print(compared.stderr[-3000:], file=sys.stderr)
        return 1
    vs_mergekit = json.loads(compared.stdout.strip().splitlines()[-1])
    evaluation = manifest(store, run, "evaluate-translation")["metrics"]
    benchmarks = (
        manifest(store, run, "evaluate-benchmarks")["metrics"] if "evaluate-benchmarks" in steps else {}
    )
    converted = json.loads((source / "_MANIFEST.json").read_text())["metrics"]
    result = {
        "store": str(store),
        # done once per machine (the cache), so a second run's steps do not show it: the manifest keeps it
        "conversion": {
            k: converted[k]
            for k in ("wheel", "file_bytes", "fetch_seconds", "convert_seconds", "parameters", "fixes")
        },
        "quick": args.quick,
        "steps": rows,
        "wall_seconds": round(sum(r["seconds"] for r in rows), 1),
        "peak_rss_mb": max(r["rss_mb"] for r in rows),
        "translate_quarantine": translate["quarantine"]["by_reason"],
        "translate_counts": translate["counts"],
        "vllm_sentences_quarantine": sentences and sentences["quarantine"]["by_reason"],
        "vllm_sentences_counts": sentences and sentences["counts"],
        "judge": {k: v.get("rows") for k, v in judge["outputs"].items()},
        "judge_labels": judge["metrics"].get("labels"),
        "loss_curve": curve,
        "merge_tensors": merge["metrics"]["tensors"],
        "merge_vs_mergekit": vs_mergekit,
        "bleu_chrf": {w: {k: evaluation[w][k] for k in ("bleu", "chrf++")} for w in ("base", "model")},
        "benchmarks": {w: benchmarks[w].get("average") for w in ("base", "model") if w in benchmarks},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, ensure_ascii=False, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1))
    problems = [f"not committed: {failed}"] if failed else []
    if vs_mergekit["max_ulp"] > 1:
        problems.append(f"merge differs from MergeKit's slerp by {vs_mergekit['max_ulp']} bf16 ulp")
    if not args.quick and not (len(curve) >= 2 and curve[-1][1] < curve[0][1]):
        problems.append(f"the loss did not go down: {curve}")
    for problem in problems:
        print(f"[small-real] {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
