"""Wall time of the tiny pipeline: a fresh run into an empty store, then cached reruns.

    .venvs/cli/bin/python bench/tiny_run.py [--repeat 3] [--cold-only]

A fresh run starts from an empty store and an empty machine cache (HALA_CACHE in a temporary folder: the tiny
stand-ins are trained, as on a new machine); then a fresh store with that cache warm (stand-ins copied, not
trained); then cached reruns. Budgets (issue 17): a fresh `make run` under 5 minutes on 2 cores after setup,
a cached one under 2 s. Run it on a quiet machine (other jobs on the two cores skew it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed_run(store: Path, cache: Path) -> tuple[float, dict[str, int]]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "hala.ops.cli", "run", "recipes/tiny.yaml", "--store", str(store)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"HALA_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin", "HALA_CACHE": str(cache)},
    )
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"run failed ({out.returncode}):\n{out.stderr}{out.stdout[-2000:]}")
    states: dict[str, int] = {}
    for line in out.stdout.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "summary":
            states[e["state"]] = states.get(e["state"], 0) + 1
    return seconds, states


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cold-only", action="store_true", help="only the fresh run from an empty machine cache")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        fresh, states = timed_run(Path(tmp) / "artifacts", cache)
        print(f"fresh, empty machine cache   {fresh:7.2f} s  {states}")
        if args.cold_only:
            return
        warm, states = timed_run(Path(tmp) / "artifacts-2", cache)
        print(f"fresh store, stand-ins built {warm:7.2f} s  {states}")
        cached = []
        for _ in range(args.repeat):
            seconds, states = timed_run(Path(tmp) / "artifacts", cache)
            cached.append(seconds)
            print(f"cached                       {seconds:7.2f} s  {states}")
    print(
        f"summary: fresh {fresh:.1f} s (budget 300 s), fresh store {warm:.1f} s, cached best "
        f"{min(cached):.2f} s / "
        f"worst {max(cached):.2f} s (budget 2 s)"
    )


if __name__ == "__main__":
    main()
