"""The whole tiny DAG with an S3 store: every enabled step (the sharded ones and their gathers included)
committed into S3 (moto's server, started here on 127.0.0.1 in its own process), checked against a local run
of the same recipe, verified file by file, then the cached rerun timed on both stores.

    .venvs/cli/bin/python bench/tiny_s3.py [--local artifacts]     # --local: a store `make run` filled

The tiny stand-ins come from this machine's cache (HALA_TINY_CACHE), as for `make run`; each is committed into
the S3 store's `_sources/` on first use. moto keeps the objects in memory: its times bound the client's own
cost, not a network's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_s3 import start_s3  # noqa: E402

RECIPE = REPO / "recipes" / "tiny.yaml"


def hala(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hala.ops.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def status(env: dict[str, str], store: str) -> dict[str, tuple]:
    out = hala(env, "status", "tiny", "--store", store, "--json")
    return {r["step"]: (r["state"], r["rows"], r["counts"]) for r in json.loads(out.stdout)}


def timed(env: dict[str, str], store: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = hala(env, "run", str(RECIPE), "--store", store)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--local", default=str(REPO / "artifacts"), help="a local store holding the tiny run (make run)"
    )
    args = p.parse_args()
    server, env = start_s3()
    s3 = "s3://hala-bench/stores/tiny"
    try:
        local_first, out = timed(env, args.local)  # fills the local store if it is not (cached otherwise)
        if out.returncode:
            sys.exit(f"local run failed: {out.stderr[-2000:]}")
        first, out = timed(env, s3)
        if out.returncode:
            sys.exit(f"S3 run failed ({out.returncode}): {out.stdout[-3000:]}\n{out.stderr[-2000:]}")
        local, remote = status(env, args.local), status(env, s3)
        enabled = [
            s["step"] for s in json.loads(hala(env, "steps", str(RECIPE), "--json").stdout) if s["enabled"]
        ]
        differ = [s for s in enabled if remote.get(s) != local.get(s)]
        committed = sum(remote.get(s, ("",))[0] == "committed" for s in enabled)
        t0 = time.perf_counter()
        verify = hala(env, "verify", "tiny", "--store", s3)
        verify_s = time.perf_counter() - t0
        cached = {}
        for where, store in (("local", args.local), ("s3", s3)):
            seconds, out = timed(env, store)
            states = {
                e.get("state")
                for e in map(json.loads, filter(lambda ln: ln.startswith("{"), out.stdout.splitlines()))
                if e.get("event") == "summary"
            }
            cached[where] = (seconds, states)
        print(
            "| steps enabled | committed on S3 | rows or counts differing from the local run | hala verify "
            "on S3 |"
            " first run on S3 | cached rerun, local | cached rerun, S3 |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(
            f"| {len(enabled)} | {committed} | {len(differ)} {differ if differ else ''} | exit "
            f"{verify.returncode} "
            f"({verify_s:.1f} s) | {first:.0f} s | {cached['local'][0]:.2f} s {sorted(cached['local'][1])} | "
            f"{cached['s3'][0]:.2f} s {sorted(cached['s3'][1])} |"
        )
    finally:
        server.kill()


if __name__ == "__main__":
    main()
