"""A step's data through the store: the same prepare step into a folder and into S3 (moto's server, started
here on 127.0.0.1 in its own process), at two sizes. Wall time, rows/s and the peak RSS of the largest process
of the run.

    .venvs/cli/bin/python bench/store_s3.py [--rows 100000 500000]

Rows are Alpaca-shaped (instruction, response, ~420 bytes of JSON each) written here; what goes to the store
is prepare's parquet output, its manifest, and for S3 the uploads of the commit (the moto server keeps objects
in memory, so its numbers are an upper bound on the client's own cost, not a network's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = "the model translates every instruction and response into Arabic while code and numbers stay".split()


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(30))
            f.write(json.dumps({"instruction": f"{i}: {text}?", "response": f"{text} {text}."}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server in its own process on 127.0.0.1 (it lives until killed or its stdin closes), with a
    bucket `hala-bench`, and the environment that points s3fs at it."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from moto.server import ThreadedMotoServer; "
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "HALA_LOG_FORMAT": "json",
    }
    time.sleep(2)
    subprocess.run(
        [sys.executable, "-c", "import s3fs; s3fs.S3FileSystem().mkdir('hala-bench')"], env=env, check=True
    )
    return server, env


def run(recipe: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the largest process: `hala run` or the step it started)."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run([sys.executable, '-m', 'hala.ops.cli', 'run', sys.argv[1]], "
        "stdout=subprocess.DEVNULL).returncode\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, env=env, cwd=REPO
    )
    seconds, rss, rc = out.stdout.split()
    if rc != "0":
        sys.exit(f"run failed ({rc}): {out.stderr[-2000:]}")
    return float(seconds), float(rss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 500_000])
    args = p.parse_args()
    server, env = start_s3()
    env["HALA_WARM"] = "0"
    try:
        print("| rows | store | seconds | rows/s | peak RSS (MB) |\n| --- | --- | --- | --- | --- |")
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.rows:
                src = Path(tmp) / f"rows-{n}.jsonl"
                write_rows(src, n)
                for where, store in (("folder", f"{tmp}/store-{n}"), ("s3 (moto)", f"s3://hala-bench/n{n}")):
                    recipe = Path(tmp) / f"r-{n}-{where[:2]}.yaml"
                    recipe.write_text(
                        json.dumps(
                            {
                                "name": "bench",
                                "store": store,
                                "run": "r",
                                "steps": {
                                    "prepare-rows": {
                                        "stage": "prepare",
                                        "inputs": {"source": str(src)},
                                        "config": {
                                            "format": "columns",
                                            "columns": {"user": "instruction", "assistant": "response"},
                                        },
                                    }
                                },
                            }
                        )
                    )
                    seconds, rss = run(recipe, env)
                    print(f"| {n:,} | {where} | {seconds:.1f} | {n / seconds:,.0f} | {rss:.0f} |", flush=True)
    finally:
        server.stdin.close()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
