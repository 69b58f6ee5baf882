"""Wall time of the tiny pipeline: a fresh run into an empty store, then cached reruns.

    .venvs/cli/bin/python bench/tiny_run.py [--repeat 3]

Budgets (foundation issue): a fresh `make run` under 10 minutes on 2 cores, a fully cached one under 10 s.
Prints one line per run and a summary; run it on a quiet machine (other jobs on the two cores skew it).
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


def timed_run(store: Path) -> tuple[float, dict[str, int]]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "hala.cli", "run", "recipes/tiny.yaml", "--store", str(store)],
                         cwd=REPO, capture_output=True, text=True, env={"HALA_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin"})
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
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "artifacts"
        fresh, states = timed_run(store)
        print(f"fresh   {fresh:7.2f} s  {states}")
        cached = []
        for _ in range(args.repeat):
            seconds, states = timed_run(store)
            cached.append(seconds)
            print(f"cached  {seconds:7.2f} s  {states}")
    print(f"summary: fresh {fresh:.1f} s (budget 600 s), cached best {min(cached):.2f} s / worst {max(cached):.2f} s (budget 10 s)")


if __name__ == "__main__":
    main()
