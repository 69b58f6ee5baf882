"""The tiny recipe's rendered Argo Workflow, run task by task in the order of its DAG on this machine, then
every step's state, rows and counts against a local run of the same code (issue 28).

    make run                                          # the local run to compare with (artifacts/)
    .venvs/cli/bin/python bench/argo_tiny.py [--local artifacts] [--store /tmp/argo-tiny]

tests/_lib/argorun.py runs each task as its image's ENTRYPOINT runs it, in the environment that holds that
image's lock (`local/hala-serve:dev-cpu` -> `.venvs/serve`), the sharded steps' Indexed Jobs through the Jobs
API stand-in (tests/_lib/kubeapi.py, which runs their pods the same way), with Argo's retry expression and
resource conditions. One task at a time (Argo would run independent ones side by side), so its wall time is
an upper bound. The test suite runs the same on a small DAG (tests/contract/test_argo.py); this is the whole
tiny DAG, ~5 minutes, which is why CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "_lib"))


def status(store: str) -> dict[str, tuple]:
    out = subprocess.run(
        [str(REPO / ".venvs/cli/bin/hala"), "status", "tiny", "--store", store, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {r["step"]: (r["state"], r["rows"], r["counts"]) for r in json.loads(out)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--local", default=str(REPO / "artifacts"), help="the store of a local tiny run (make run)"
    )
    p.add_argument("--store", default="/tmp/hala-argo-tiny", help="an empty store for the Workflow's run")
    args = p.parse_args()
    import argorun
    from hala.contract import recipe as recipe_mod
    from hala.ops import argo
    from kubeapi import KubeAPI

    if not Path(args.local, "tiny", "_RUN.json").exists():
        sys.exit(f"{args.local}/tiny: no local run to compare with; run `make run` first (or --local)")
    shutil.rmtree(args.store, ignore_errors=True)
    recipe = recipe_mod.load(str(REPO / "recipes" / "tiny.yaml"), store=args.store)
    workflow = argo.workflow(recipe, "cpu", recipe_arg=str(recipe.path.resolve()), store_arg=args.store)
    logs: dict[str, str] = {}
    t = time.monotonic()
    with KubeAPI(ns="hala-tiny", max_requests=100_000, seconds=7200, controller=True) as api:
        result = argorun.run(workflow, api, dict(os.environ), timeout=1800, logs=logs)
        api.settle()
        pods = len(api.pods)
    seconds = time.monotonic() - t
    failed = {k: v for k, v in result.items() if v[0] != "Succeeded"}
    for name in failed:
        print(f"{name}: {failed[name]}\n{logs.get(name, '')[-1500:]}", file=sys.stderr)
    ours, local = status(args.store), status(args.local)
    enabled = [s.name for s in recipe.steps.values() if s.enabled]
    differing = [s for s in enabled if ours.get(s) != local.get(s)]
    print(
        f"tasks: {len(result)} ({sum(v[0] == 'Succeeded' for v in result.values())} succeeded, "
        f"{sum(v[1] for v in result.values())} attempts, {pods} Job pods); {seconds:.0f} s; steps committed: "
        f"{sum(ours.get(s, ('',))[0] == 'committed' for s in enabled)} of {len(enabled)}; "
        f"state, rows or counts differing from the local run: {differing or 'none'}"
    )
    return 1 if failed or differing else 0


if __name__ == "__main__":
    sys.exit(main())
