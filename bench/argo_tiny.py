"""The tiny recipe's rendered Argo Workflow, run task by task in the order of its DAG on this machine, then
every step's state, rows and counts against a local run of the same code (issue 28).

    make run                                          # the local run to compare with (artifacts/)
    .venvs/cli/bin/python bench/argo_tiny.py [--local artifacts] [--store /tmp/argo-tiny]
    .venvs/cli/bin/python bench/argo_tiny.py --images --store s3://bucket/runs   # each pod in its image (CI)

tests/_lib/argorun.py runs the DAG's tasks as Argo would start them (every task whose dependencies succeeded,
`--parallel` at a time), each pod through tests/_lib/podrun.py: by default in the environment that holds its
image's lock (`local/hala-serve:dev-cpu` -> `.venvs/serve`); with --images as `docker run` of the image
itself, with the container's command, environment, emptyDirs, the recipe's ConfigMap and the store's Secret
(from this environment's AWS_* variables) as rendered. The sharded steps' Indexed Jobs go through the Jobs API
stand-in (tests/_lib/kubeapi.py, whose pods run the same way), with Argo's retry expression and resource
conditions; the served translator's Deployment is started when its scale-up task patches it to 1 replica
(its startup probe waited for) and stopped by the scale-down task, its Service's name reaching it on
127.0.0.1. CI runs it with --images on an S3 store; the test suite runs the same on a small DAG
(tests/contract/test_argo.py).
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
    p.add_argument(
        "--images",
        action="store_true",
        help="each pod in its image (docker run, as rendered: the recipe's ConfigMap mounted, the store's "
        "credentials from this environment as the Secret hala-store-credentials); default: in .venvs",
    )
    p.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="the Docker client")
    p.add_argument("--parallel", type=int, default=2, help="tasks at a time (Argo starts every ready one)")
    args = p.parse_args()
    import argorun
    import podrun
    from hala.contract import recipe as recipe_mod
    from hala.ops import argo, compose, k8s, manifests
    from kubeapi import KubeAPI

    if not Path(args.local, "tiny", "_RUN.json").exists():
        sys.exit(f"{args.local}/tiny: no local run to compare with; run `make run` first (or --local)")
    if "://" not in args.store:
        shutil.rmtree(args.store, ignore_errors=True)
    recipe = recipe_mod.load(str(REPO / "recipes" / "tiny.yaml"), store=args.store)
    # in the images the recipe is the ConfigMap's file, mounted where the rendering says; in .venvs its path
    recipe_arg = None if args.images else str(recipe.path.resolve())
    workflow = argo.workflow(recipe, "cpu", recipe_arg=recipe_arg, store_arg=args.store)
    objects = [
        o
        for n in recipe.served
        for o in k8s.served_objects(recipe, n, "cpu", recipe_arg=recipe_arg, store_arg=args.store)
    ]
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    secrets = {"hala-store-credentials": {k: os.environ[k] for k in compose.STORE_ENV if k in os.environ}}
    services = podrun.service_ports(objects)
    if args.images:
        config_maps = {
            o["metadata"]["name"]: o["data"] for o in manifests.common_objects(recipe)["recipe.yaml"]
        }
        pods = podrun.Docker(args.docker, secrets=secrets, services=services, config_maps=config_maps)
    else:
        pods = podrun.Venvs(dict(os.environ), secrets=secrets, services=services)
    logs: dict[str, str] = {}
    t = time.monotonic()
    with KubeAPI(
        ns=k8s.namespace(recipe), max_requests=100_000, seconds=7200, controller=True, pods=pods
    ) as api:
        served = argorun.Served(pods, deployments, timeout=900)
        result = argorun.run(
            workflow, api, {}, timeout=1800, logs=logs, pods=pods, parallel=args.parallel, served=served
        )
        api.settle()
        job_pods = len(api.pods)
    seconds = time.monotonic() - t
    failed = {k: v for k, v in result.items() if v[0] != "Succeeded"}
    for name in failed:
        print(f"{name}: {failed[name]}\n{logs.get(name, '')[-1500:]}", file=sys.stderr)
    for name, text in served.logs.items():
        if failed:
            print(f"{name} (served) log:\n{text[-1500:]}", file=sys.stderr)
    ours, local = status(args.store), status(args.local)
    enabled = [s.name for s in recipe.steps.values() if s.enabled]
    differing = [s for s in enabled if ours.get(s) != local.get(s)]
    print(
        f"tasks: {len(result)} ({sum(v[0] == 'Succeeded' for v in result.values())} succeeded, "
        f"{sum(v[1] for v in result.values())} attempts, {job_pods} Job pods, {args.parallel} at a time, "
        f"{'images' if args.images else '.venvs'}); served scaled: {served.history}; {seconds:.0f} s; "
        f"steps committed: {sum(ours.get(s, ('',))[0] == 'committed' for s in enabled)} of {len(enabled)}; "
        f"state, rows or counts differing from the local run: {differing or 'none'}"
    )
    for step in differing:
        print(f"  {step}: workflow {ours.get(step)} / local {local.get(step)}")
    return 1 if failed or differing else 0


if __name__ == "__main__":
    sys.exit(main())
