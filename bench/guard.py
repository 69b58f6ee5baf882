"""A quick guard for the figures that matter (issue 30): each bench of this folder with small inputs, its
result against the figure recorded for the same small input (bench/README.md, "Issue 30"), in about two
minutes on this machine.

    .venvs/cli/bin/python bench/guard.py                       # every check
    .venvs/cli/bin/python bench/guard.py --only merge,prepare  # some of them
    .venvs/cli/bin/python bench/guard.py --store artifacts     # the cached-run check reruns a finished run

It prints a table and exits 1 when a figure is clearly worse than its record: past the tolerance this shared
2-core machine's noise needs (runs of the same code move by 10-25%). CI does not run it (too noisy, too slow);
the stop checklist in the README does. When a change moves a figure on purpose, measure it with the full
bench, record it in bench/README.md and here.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENVS = REPO / ".venvs"


@dataclass
class Check:
    name: str
    what: str
    recorded: float  # the last figure in bench/README.md (its date in `source`)
    source: str
    higher_is_better: bool
    tolerance: float  # the share by which a figure may be worse before it is a regression

    def verdict(self, value: float) -> str:
        limit = self.recorded * (1 - self.tolerance if self.higher_is_better else 1 + self.tolerance)
        worse = value < limit if self.higher_is_better else value > limit
        return f"REGRESSION (limit {limit:.3g})" if worse else "ok"


# Recorded for the same small inputs on 2026-12-07 (bench/README.md, "Issue 30"), 2 cores: medians of the runs
# that day; the full benches' figures for the large inputs are beside them in the README.
CHECKS = {
    "merge": Check(
        "merge",
        "merge stage / mergekit-yaml, wall, 135M shapes (1 run each)",
        0.74,
        "merge_vs_mergekit.py --pairs 135m (2026-11-26: 0.74; 2026-12-07: 0.74, 0.83)",
        higher_is_better=False,
        tolerance=0.25,
    ),
    "translate": Check(
        "translate",
        "translate stage / raw transformers engine, tok/s, 256 rows (median of 3)",
        0.83,
        "2026-12-07: 0.89, 0.83, 1.10, 0.77 (2048 rows, 2026-11-26: 0.978)",
        higher_is_better=True,
        tolerance=0.25,
    ),
    "prepare": Check(
        "prepare",
        "prepare rows/s, 100K Alpaca rows, one process",
        38_000,
        "2026-12-07: 33.0K, 43.3K, 39.8K, 35.6K (1M rows: 50,793)",
        higher_is_better=True,
        tolerance=0.25,
    ),
    "cached": Check(
        "cached",
        "cached `make run` of the tiny recipe, s (median of 5)",
        0.44,
        "2026-12-07: 0.44, 0.51, 0.59 (the budget: 1 s)",
        higher_is_better=False,
        tolerance=1.0,
    ),
    "s3": Check(
        "s3",
        "S3 commit of a 0.25 GB model folder against s3fs put, speed",
        1.0,
        "2026-12-07: 1.04, 0.94 (2 GB, 2026-12-02: 1.19, 1.30)",
        higher_is_better=True,
        tolerance=0.3,
    ),
}


def _run(cmd: list[str], timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exit {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def merge(_: argparse.Namespace) -> float:
    out = _run(
        [str(VENVS / "merge/bin/python"), "bench/merge_vs_mergekit.py", "--pairs", "135m", "--repeats", "1"]
    )
    return next(json.loads(line) for line in out.splitlines() if line.startswith("{"))["wall_ratio"]


def translate(_: argparse.Namespace) -> float:
    out = _run(
        [
            str(VENVS / "serve/bin/python"),
            "bench/translate_throughput.py",
            "--rows",
            "256",
            "--chunk-rows",
            "64",
            "--engines",
            "transformers",
            "--repeats",
            "3",
        ]
    )
    return statistics.median(r["ratio"] for r in json.loads(out.strip().splitlines()[-1]))


def prepare(_: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix="hala-guard-") as tmp:
        out = Path(tmp) / "scale.json"
        _run(
            [
                str(VENVS / "cli/bin/python"),
                "bench/scale.py",
                "--rows",
                "100000",
                "--alpaca",
                "--prepare-only",
                "--out",
                str(out),
            ]
        )
        row = next(r for r in json.loads(out.read_text()) if r["step"].startswith("prepare"))
        return row["rows_in"] / row["seconds"]


def cached(args: argparse.Namespace) -> float:
    store = Path(args.store)
    if not (store / "tiny" / "_RUN.json").exists():
        raise FileNotFoundError(
            f"{store}/tiny: no finished tiny run to rerun (run `make run` first, or --store)"
        )
    times = []
    for _ in range(5):
        t = time.perf_counter()
        _run(["make", "run", f"STORE={store}"])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def s3(_: argparse.Namespace) -> float:
    out = _run(
        [
            str(VENVS / "cli/bin/python"),
            "bench/store_throughput.py",
            "--model-gb",
            "0.25",
            "--data-gb",
            "0.1",
            "--repeat",
            "1",
        ]
    )
    line = next(line for line in out.splitlines() if line.startswith("| upload a model folder"))
    return float(re.split(r"\s*\|\s*", line.strip("| "))[4])


MEASURE = {"merge": merge, "translate": translate, "prepare": prepare, "cached": cached, "s3": s3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated, of {','.join(CHECKS)}")
    p.add_argument("--store", default=str(REPO / "artifacts"), help="the store of a finished tiny run")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(CHECKS)
    rows, failed = [], False
    for name in names:
        check = CHECKS[name]
        t = time.perf_counter()
        try:
            value = MEASURE[name](args)
            verdict = check.verdict(value)
            failed |= verdict != "ok"
            shown = f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"
        except (RuntimeError, FileNotFoundError, StopIteration, KeyError, ValueError) as e:
            shown, verdict = "-", f"not measured: {e}"[:200]
            failed = True
        rows.append(
            (check.what, shown, f"{check.recorded:,}", check.source, verdict, time.perf_counter() - t)
        )
        print(f"[guard] {name}: {shown} ({verdict})", file=sys.stderr, flush=True)
    print(
        "| figure | now | recorded | recorded by | verdict | seconds |\n| --- | --- | --- | --- | --- | --- |"
    )
    for what, now, recorded, source, verdict, seconds in rows:
        print(f"| {what} | {now} | {recorded} | {source} | {verdict} | {seconds:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
