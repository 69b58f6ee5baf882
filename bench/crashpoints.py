"""A crash at every store operation, then a rerun: points tried and points healed, per kind and store (issue
32).

    .venvs/cli/bin/python bench/crashpoints.py        # every point, SIGKILL, every kind and store
    .venvs/cli/bin/python bench/crashpoints.py --modes kill,raise-after --stores s3 --kinds sharded \
        --sample 10

For each kind (a plain step, a 3-shard step and its gather, an artifact's ensure; tests/_lib/crashcases.py) on
each store (a local folder, moto's S3 server, fake-gcs-server, all on 127.0.0.1), one uninterrupted run counts
the sequence's mutating store operations and records what it commits; then, for every N (or a sample), a fresh
store is crashed at operation N and the whole sequence is run again. A point healed when the rerun exits 0
everywhere, `hala verify` passes and the committed rows and file hashes equal the uninterrupted run's, and the
crash itself was not reported as bad data or a bug. Object stores' operation counts vary a little between runs
(lease renewals are timed), so N runs up to the reference count. Results go to stdout and, with --json, to a
file; bench/README.md keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "_lib"))

import crashcases  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(crashcases.KINDS))
    p.add_argument("--stores", default=",".join(crashcases.STORES))
    p.add_argument("--modes", default="kill", help="kill, raise, raise-after (comma-separated)")
    p.add_argument(
        "--sample", type=int, default=0, help="this many points spread over the sequence (0: every point)"
    )
    p.add_argument("--tiny-cache", default=None, help="machine cache of tiny stand-ins (default: hala's own)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.tiny_cache is None:
        from hala.contract.store import cache_root  # noqa: PLC0415 - the library's own default

        args.tiny_cache = str(cache_root() / "tiny")
    results = []
    work = Path(tempfile.mkdtemp(prefix="hala-crashpoints-"))
    try:
        for store_name in args.stores.split(","):
            with crashcases.store(store_name) as where:
                for kind in args.kinds.split(","):
                    folder = work / f"{store_name}-{kind}"
                    ref = folder / "reference"
                    t0 = time.monotonic()
                    total, expected = crashcases.reference(
                        kind, ref, where.url_for(ref), where.env, Path(args.tiny_cache), where.root(ref)
                    )
                    points = (
                        crashcases.sample(total, args.sample) if args.sample else list(range(1, total + 1))
                    )
                    for mode in args.modes.split(","):
                        trials = []
                        for at in points:
                            trial_dir = folder / f"{mode}-{at}"
                            trials.append(
                                crashcases.trial(
                                    kind,
                                    trial_dir,
                                    where.url_for(trial_dir),
                                    where.env,
                                    Path(args.tiny_cache),
                                    where.root(trial_dir),
                                    at,
                                    mode,
                                    expected,
                                )
                            )
                            shutil.rmtree(trial_dir, ignore_errors=True)
                            if not trials[-1].healed:
                                print(
                                    f"  not healed: {kind} on {store_name}, {mode} at {at}: {trials[-1].why}",
                                    flush=True,
                                )
                        row = {
                            "kind": kind,
                            "store": store_name,
                            "mode": mode,
                            "operations": total,
                            "tried": len(trials),
                            "healed": sum(t.healed for t in trials),
                            "seconds": round(time.monotonic() - t0, 1),
                            "crash_exit_codes": sorted({c for t in trials for c in t.crashed}),
                            "not_healed": [{"at": t.at, "why": t.why[:2000]} for t in trials if not t.healed],
                        }
                        results.append(row)
                        print(
                            f"{kind:9} {store_name:6} {mode:12} operations {total:4}  tried "
                            f"{row['tried']:4}  healed "
                            f"{row['healed']:4}  exit codes of the crashed runs {row['crash_exit_codes']}  "
                            f"{row['seconds']:.0f} s",
                            flush=True,
                        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["tried"] == r["healed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
