"""Two translate shards sharing one served model against two shards each loading the model in process:
the same tiny translator, the same rows, vLLM's CPU build both ways, through `hala run` (the local runner).

    .venvs/cli/bin/python bench/served_vs_inprocess.py [--rows 96] [--out /tmp/hala-served-bench]

A: `engine: vllm`, shards 2: each shard starts its own vLLM engine (the local runner runs shards one after the
   other, as 2 pods of a Job would each pay their start on a cluster).
B: `served: translator` (vLLM's OpenAI server, started once by the runner) and `endpoint: {served: ...}`:
   the 2 shards are clients of it.
Reported: the run's wall time, engine/server start-up, generation time (start-up excluded), completion tokens
and tokens/s with and without start-up. Figures: bench/README.md ("served_vs_inprocess.py").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / ".venvs" / "cli" / "bin" / "python"
SOURCE = REPO.parent / "shared" / "data" / "en-lima" / "lima.json"
TRANSLATE = {
    "unit": "paragraph",
    "max_model_len": 512,
    "sampling": {"max_tokens": 128},
    "chunk_rows": 16,
}


def recipe(folder: Path, rows: int, served: bool) -> Path:
    steps = {
        "prepare-lima": {
            "stage": "prepare",
            "inputs": {"source": str(SOURCE)},
            "config": {"format": "alpaca", "max_rows": rows},
        },
        "translate-lima": {
            "stage": "translate",
            "shards": 2,
            "inputs": {"data": "prepare-lima"},
            "config": {
                **TRANSLATE,
                **(
                    {"endpoint": {"served": "translator", "max_concurrency": 32}}
                    if served
                    else {"engine": "vllm"}
                ),
            },
        },
    }
    if not served:
        steps["translate-lima"]["inputs"]["model"] = "tiny:translator"
    body = {
        "name": "bench-served",
        "store": str(folder / "store"),
        "run": "served" if served else "inprocess",
        "tiny_models": {"pairs": str(REPO / "recipes" / "samples" / "pairs.en-ar.tsv")},
        "steps": steps,
    }
    if served:
        body["served"] = {"translator": {"model": "tiny:translator", "max_model_len": 512, "port": 18231}}
    path = folder / f"{body['run']}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run(path: Path, env: dict[str, str]) -> tuple[float, list[dict]]:
    t0 = time.monotonic()
    out = subprocess.run(
        [str(CLI), "-m", "hala.ops.cli", "run", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    wall = time.monotonic() - t0
    if out.returncode:
        sys.exit(f"{path.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    events = []
    for line in (out.stdout + out.stderr).splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return wall, events


def shards(store: Path, run: str) -> tuple[list[dict], dict]:
    """Each shard's engine start, generation time and tokens, from the step's gathered manifest."""
    m = json.loads((store / run / "translate-lima" / "_MANIFEST.json").read_text())
    out = [
        {
            "engine_start_seconds": (s.get("engine") or {}).get("start_seconds"),
            "generation_seconds": s.get("generation_seconds"),
            "completion_tokens": s.get("completion_tokens"),
        }
        for s in m["metrics"]["shards"]
    ]
    return out, {"shard_seconds": m["timings"].get("shard_seconds"), "quarantine": m.get("quarantine")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--out", default="/tmp/hala-served-bench")
    args = p.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HALA_LOG_FORMAT": "json", "HALA_TINY_CACHE": str(folder / "tiny-cache")}
    # the stand-in built and the rows prepared once, outside both timings
    warm = recipe(folder, args.rows, served=False)
    subprocess.run(
        [str(CLI), "-m", "hala.ops.cli", "run", str(warm), "--only", "prepare-lima"],
        env=env,
        check=True,
        capture_output=True,
    )
    results = {}
    for served in (False, True):
        path = recipe(folder, args.rows, served)
        wall, events = run(path, env)
        per_shard, more = shards(folder / "store", path.stem)
        server = next((e["seconds"] for e in events if e.get("event") == "served"), None)
        start = sum(s["engine_start_seconds"] or 0 for s in per_shard) + (server or 0)
        gen = sum(s["generation_seconds"] or 0 for s in per_shard)
        tokens = sum(s["completion_tokens"] or 0 for s in per_shard)
        results[path.stem] = {
            "wall_seconds": round(wall, 1),
            "server_start_seconds": server,
            "shards": per_shard,
            **more,
            "start_up_seconds": round(start, 1),
            "generation_seconds": round(gen, 1),
            "completion_tokens": tokens,
            "tokens_per_s_with_start": round(tokens / (start + gen), 1),
            "tokens_per_s_without_start": round(tokens / gen, 1),
        }
        print(path.stem, json.dumps(results[path.stem]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
