"""Two writers of one step, many times, on every store, one of them frozen past its lease (issue 32).

    .venvs/cli/bin/python bench/two_writers.py  # 20 pairs per store: local, S3 (moto), GCS (fake-gcs-server)
    .venvs/cli/bin/python bench/two_writers.py --pairs 5 --stores s3

Each pair (tests/_lib/crashcases.py `pair`): two `python -m stages.prepare` of one step, started a random
0-1.5 s apart; the first freezes itself (SIGSTOP) at a random one of its store operations for 3 s, past the 2
s lease TTL, then goes on. On an object store the second takes the lease over meanwhile and the two race to
the commit; on a local store the flock of a frozen process is still held and the second waits. Counted:
commits (must be 1), exit codes (0 or 75), manifests that point at a missing file or a wrong hash (`hala
verify`, must be 0).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "_lib"))

import crashcases  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--stores", default=",".join(crashcases.STORES))
    p.add_argument("--seed", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args()
    rng = random.Random(args.seed)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="hala-two-writers-"))
    try:
        for name in args.stores.split(","):
            with crashcases.store(name) as where:
                ref = work / f"{name}-reference"
                total, _ = crashcases.reference(
                    "step", ref, where.url_for(ref), where.env, work / "tiny", where.root(ref)
                )
                t0 = time.monotonic()
                pairs = []
                for i in range(args.pairs):
                    folder = work / f"{name}-{i}"
                    pairs.append(crashcases.pair(where, folder, work / "tiny", total, rng))
                    shutil.rmtree(folder, ignore_errors=True)
                    if not pairs[-1]["ok"]:
                        print(f"  pair {i} on {name}: {json.dumps(pairs[-1])[:3000]}", flush=True)
                row = {
                    "store": name,
                    "pairs": len(pairs),
                    "paused": sum(p["paused"] for p in pairs),
                    "one_commit": sum(p["commits"] == 1 for p in pairs),
                    "bad_manifests": sum(not p["verified"] for p in pairs),
                    "exit_codes": dict(Counter(str(sorted(p["codes"])) for p in pairs)),
                    "seconds": round(time.monotonic() - t0, 1),
                    "details": pairs,
                }
                rows.append(row)
                print(
                    f"{name:6} pairs {row['pairs']}  frozen past the TTL {row['paused']}  exactly one commit "
                    f"{row['one_commit']}  bad manifests {row['bad_manifests']}  exit codes "
                    f"{row['exit_codes']}  "
                    f"{row['seconds']:.0f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["one_commit"] == r["pairs"] and r["bad_manifests"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
