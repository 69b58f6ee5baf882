"""`make setup` from nothing: wall time, the size of .venvs/ (and of the package cache it links from), and the
time of a second `make setup`, for one or more revisions of this repository, side by side on one machine.

    python3 bench/setup_time.py                      # HEAD
    python3 bench/setup_time.py b6eca60 HEAD         # the last pip-based setup against the uv one

Each revision is cloned into a temporary folder and set up with empty caches of its own (PIP_CACHE_DIR,
UV_CACHE_DIR and HALA_CACHE point into the temporary folder), so the runs do not help each other; the
machine's pip configuration (find-links, mirrors) is used as a user's would be. Sizes are `du` of the folder:
hardlinked files count once, as they lie on disk once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def du(*paths: Path) -> str:
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return "0"
    out = subprocess.run(["du", "-sch", *existing], capture_output=True, text=True).stdout.splitlines()
    return out[-1].split()[0]


def measure(rev: str, work: Path) -> dict[str, str]:
    clone = work / f"clone-{rev}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", rev], check=True)
    caches = work / f"caches-{rev}"
    env = {
        **os.environ,
        "PIP_CACHE_DIR": str(caches / "pip"),
        "UV_CACHE_DIR": str(caches / "uv"),
        "HALA_CACHE": str(caches / "hala"),
    }
    t0 = time.monotonic()
    first = subprocess.run(["make", "setup"], cwd=clone, env=env, capture_output=True, text=True)
    fresh = time.monotonic() - t0
    if first.returncode:
        sys.exit(f"{rev}: make setup failed:\n{first.stdout[-2000:]}{first.stderr[-2000:]}")
    t0 = time.monotonic()
    subprocess.run(["make", "setup"], cwd=clone, env=env, capture_output=True, check=True)
    again = time.monotonic() - t0
    return {
        "rev": rev,
        "fresh": f"{fresh:.0f} s",
        "again": f"{again:.2f} s",
        "venvs": du(clone / ".venvs"),
        "venvs+caches": du(clone / ".venvs", caches),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("revs", nargs="*", default=["HEAD"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory(
        prefix="hala-setup-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")
    ) as tmp:
        rows = [measure(rev, Path(tmp)) for rev in args.revs]
    print("| revision | make setup, fresh | second make setup | .venvs/ | .venvs/ + caches |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['rev']} | {r['fresh']} | {r['again']} | {r['venvs']} | {r['venvs+caches']} |")


if __name__ == "__main__":
    main()
