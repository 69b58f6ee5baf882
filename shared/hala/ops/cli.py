"""The `hala` command.

    hala run RECIPE [--store URL] [--run NAME] [--set STEP.KEY=VALUE ...] [--only STEP ...] [--force [STEP]]
                    [--dry-run]
    hala steps RECIPE [--config STEP] the DAG in order, with stage and inputs; or one step's effective config
    --set-file FILE                   (run, steps, render, record) overrides from a YAML file, STEP.KEY: VALUE
    hala status RUN [--store URL]     state, rows and time per step, and the files no commit references
    hala verify RUN [STEP ...]        re-hash committed outputs (and the store's _sources/, _cache/) against
                                      their manifests (exit 3 on a change, 2 for a run or step that is absent)
    hala gc RUN [--delete]            list (or remove) files no commit references, older than --grace seconds
    hala gather RECIPE STEP           commit a sharded step once all its shards committed their parts
    hala setup [ENV ...]              create/update the environments under .venvs/ from locks/ (idempotent)
    hala lock [SET ...] [--check]     resolve locks/<variant>/<set>.txt with uv (--check: offline staleness)
    hala test [ENV ...] [-- ARGS]     run every test suite in its own environment
    hala schema STAGE [--write]       print/write a stage's config.schema.json (in the stage's environment)
    hala run RECIPE --runner compose  the same DAG in containers (`docker compose up`), then every service's
                                      exit code
    hala render compose RECIPE        the compose file of a recipe (compose.yaml is the tiny recipe's)
    hala images list|build|check [SET ...]  the stage images (one per dependency set), built with docker
    hala record RECIPE                write the run's header (_RUN.json); the first service of a container
                                      runner

Exit codes: 0 ok, 2 usage or config error, 3 bad input data, 75 temporary failure (worth a retry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hala.contract import logs
from hala.contract import recipe as recipe_mod
from hala.contract.errors import ConfigError, HalaError, TemporaryError, exit_code_for
from hala.contract.store import Store
from hala.ops import envs, runner, runs
from hala.ops.gather import gather

DEFAULT_STORE = "artifacts"


def _load(args: argparse.Namespace, **kw: object) -> recipe_mod.Recipe:
    """The recipe with its overrides: every --set-file (in order), then every --set (which win)."""
    items: list[str] = []
    sources: dict[str, str] = {}
    for path in getattr(args, "set_file", None) or []:
        more, where = recipe_mod.read_set_file(path)
        items += more
        sources.update(where)
    return recipe_mod.load(args.recipe, overrides=items + list(args.set), override_sources=sources, **kw)


def cmd_run(args: argparse.Namespace) -> int:
    recipe = _load(args, store=args.store, run=args.run)
    if args.dry_run:
        warnings = [  # a cache keyed by a name whose content can change: say so every time
            {
                "warning": "hub input not pinned",
                "step": step_name,
                "input": ref.name,
                "repo": ref.uri,
                "fix": f"hala pin {args.recipe}  (or {ref.raw}@<commit sha> in the recipe)",
            }
            for step_name, ref in recipe_mod.unpinned_hub_inputs(recipe)
        ]
        if not args.json:  # with --json they are in the plan: stdout is one JSON document
            for w in warnings:
                logs.get("hala.plan").warning(w["warning"], **{k: v for k, v in w.items() if k != "warning"})
        rows = runs.plan(recipe, args.only, args.force)
        served = runs.served_plan(recipe, args.only)
        if args.json:
            plan = {"recipe": str(recipe.path), "store": recipe.store, "run": recipe.run, "steps": rows}
            print(json.dumps({**plan, "served": served, "warnings": warnings}, indent=2))
        else:
            print(
                f"plan of {recipe.name} ({recipe.path}) -> {recipe.store}/{recipe.run}/  ({len(rows)} steps)"
            )
            for r in rows:
                r["inputs"] = ", ".join(f"{k}={v}" for k, v in r["inputs"].items())
            print(logs.table(rows, ["step", "stage", "shards", "state", "inputs"]))
            if served:  # started once for the steps that use it, stopped after the last
                for r in served:
                    r["users"] = ", ".join(r["users"])
                print(f"\nserved models ({len(served)}):")
                print(logs.table(served, ["served", "model", "server", "replicas", "users"]))
        return 0
    if args.runner != "local" and (args.only or args.force or args.keep_going):
        raise ConfigError(
            f"--only, --force and --keep-going are for the local runner; --runner {args.runner} runs every "
            "enabled step (committed steps are cached inside their containers)"
        )
    if args.runner == "compose":
        from hala.ops import compose

        return compose.run(recipe, args.variant, timeout=args.timeout, export=args.export)
    if args.runner == "k8s":
        from hala.ops import conductor, k8s, kubejobs

        jobs = kubejobs.KubeJobs(
            args.namespace or k8s.namespace(recipe), selector=conductor.run_selector(recipe)
        )
        return conductor.conduct(recipe, jobs, variant=args.variant, registry=args.registry, tag=args.tag)
    code = runner.run(recipe, args.only, args.force, keep_going=args.keep_going, verbose=args.verbose)
    if args.report:  # in this process: `make run` saves a second interpreter's start-up and imports
        _write_report(Store(recipe.store), recipe.run, None)
    return code


def cmd_pin(args: argparse.Namespace) -> int:
    """Resolve every hub input the recipe does not pin itself to the commit its default branch names now, and
    write them to the lock beside the recipe (a commit the recipe names stays in the recipe)."""
    import datetime as dt
    import os

    import yaml

    from hala.contract import sources

    recipe = _load(args, check_paths=False)
    refs = {
        recipe_mod.hub_key(r): r
        for s in recipe.steps.values()
        for r in s.inputs.values()
        if r.kind == "hub" and r.pinned != "recipe"
    }
    if refs and sources.hub_offline():
        raise ConfigError("hala pin asks the hub for each repository's commit: unset HF_HUB_OFFLINE")
    old = recipe_mod.read_lock(recipe.path)
    pins: dict[str, str] = {}
    for key, ref in sorted(refs.items()):
        try:
            pins[key] = sources.hub_commit(ref.hub_type, ref.uri or "", None)
        except Exception as e:  # noqa: BLE001 - a repository the hub does not know is the recipe's mistake
            if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
                raise ConfigError(
                    f"{ref.raw} ({ref.hub_type}): the hub has no such repository, or refuses this token "
                    f"({type(e).__name__}); fix the id, or set HF_TOKEN"
                ) from None
            raise TemporaryError(
                f"the hub did not answer for {ref.raw}: {type(e).__name__}: {str(e)[:300]}; "
                f"nothing was written, run `hala pin` again"
            ) from e
    path = recipe_mod.lock_path(recipe.path)
    header = (
        f"# Hub revisions of {recipe.path.name}, written by `hala pin {args.recipe}` on "
        f"{dt.date.today().isoformat()}: every hub input\n# the recipe does not pin (hub:ORG/NAME@REV) reads "
        "the commit named here. Run `hala pin` again to move them.\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump({"hub": pins}, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    rows = [
        {
            "repository": k,
            "commit": v[:12],
            "change": "same" if old.get(k) == v else "new" if k not in old else f"was {old[k][:12]}",
        }
        for k, v in pins.items()
    ]
    print(logs.table(rows, ["repository", "commit", "change"]) if rows else "no unpinned hub input")
    print(f"wrote: {path}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    recipe = _load(args, store=args.store, run=args.run)
    runs.record(recipe, Store(recipe.store), runner_name=args.runner)
    logs.get("hala.record").info("run recorded", run=recipe.run, store=recipe.store, steps=len(recipe.steps))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    if not args.recipe:
        raise ConfigError(f"`hala render {args.what}` needs a recipe, e.g. recipes/tiny.yaml")
    recipe = _load(args, check_paths=False, store=args.store, run=args.run)
    args.variant = args.variant or ("cpu" if args.what == "compose" else "cuda")
    if args.queue:
        recipe.kubernetes["queue"] = args.queue  # Kueue: every Job labelled with it, created suspended
    if args.what == "compose":
        from hala.ops import compose

        body = compose.text(recipe, args.variant, file=Path(args.out).name if args.out else "compose.yaml")
    else:
        from hala.ops import argo, kueue, manifests

        if args.out:
            if args.what == "argo":
                paths = argo.write(recipe, args.out, args.variant, args.registry, args.tag)
            elif args.what == "kueue":
                paths = kueue.write(recipe, args.out)
            else:
                paths = manifests.write(recipe, args.out, args.variant, args.registry, args.tag)
            for path in paths:
                print(f"wrote: {path}")
            return 0
        if args.what == "argo":
            files = argo.render(recipe, args.variant, args.registry, args.tag)
        elif args.what == "kueue":
            files = kueue.render(recipe)
        else:
            files = manifests.render(recipe, args.variant, args.registry, args.tag)
        body = manifests.dump(
            [o for name, objs in files.items() if name != "kustomization.yaml" for o in objs]
        )
    if args.out:
        Path(args.out).write_text(body)
    else:
        sys.stdout.write(body)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from hala.ops import images

    if args.action == "list":
        rows = images.describe(args.variant)
        print(
            json.dumps(rows, indent=2)
            if args.json
            else logs.table(rows, ["image", "stages", "base", "layers"])
        )
        return 0
    if args.action == "check":
        return images.check(args.sets or None, args.variant, registry=args.registry, tag=args.tag)
    return images.build(args.sets or None, args.variant, base=args.base, registry=args.registry, tag=args.tag)


def cmd_steps(args: argparse.Namespace) -> int:
    recipe = _load(args, check_paths=False)
    if args.config:
        step = recipe.step(args.config)
        flat = recipe_mod._flat(step.config)
        rows = [
            {"key": k, "value": json.dumps(v, ensure_ascii=False), "from": step.provenance.get(k, "default")}
            for k, v in flat.items()
        ]
        if args.json:
            print(
                json.dumps(
                    {
                        "step": step.name,
                        "stage": step.stage,
                        "config": step.config,
                        "from": {r["key"]: r["from"] for r in rows},
                    },
                    indent=2,
                    ensure_ascii=False,
                )
            )
        else:
            print(
                f"{step.name} (stage {step.stage}): the effective config, each value with where it came from"
            )
            print(logs.table(rows, ["key", "value", "from"]))
        return 0
    rows = []
    for i, step in enumerate(recipe.steps.values(), 1):
        rows.append(
            {
                "#": i,
                "step": step.name,
                "stage": step.stage + ("" if step.spec else " (not built yet)"),
                "shards": step.shards,
                "enabled": step.enabled,
                "inputs": ", ".join(f"{k}={v.describe()}" for k, v in step.inputs.items()),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(logs.table(rows, ["#", "step", "stage", "shards", "inputs"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hala.ops import gc

    store = Store(args.store)
    rows = runs.status(store, args.run)
    garbage = gc.collect(store, args.run, grace_s=0, leases=False)  # all of it; gc itself keeps what is young
    for r in rows:
        root = store.path(args.run, r["step"]) + "/"
        mine = [size for path, size, _ in garbage.files if path.startswith(root)]
        r["garbage"] = {"files": len(mine), "bytes": sum(mine)}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        r["rows"] = ", ".join(f"{k}={v}" for k, v in (r["rows"] or {}).items())
        r["cached"] = "yes" if r["cached"] else ""
        r["seconds"] = f"{r['seconds']:.1f}" if isinstance(r["seconds"], (int, float)) else ""
    columns = ["step", "stage", "state", "cached", "seconds", "rows", "exit_code", "error"]
    if any(r.get("attempts") for r in rows):
        columns.insert(3, "attempts")  # Kubernetes Jobs of the step (the conductor retries failed ones)
    print(logs.table(rows, columns))
    if garbage.files:
        print(
            f"garbage: {len(garbage.files)} files, {garbage.bytes / 1e6:.1f} MB no commit references "
            f"({', '.join(f'{n} {why}' for why, n in garbage.by_reason().items())}); `hala gc {args.run} "
            "--delete` "
            f"removes those older than {gc.GRACE_S / 3600:g} h (--grace)"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from hala.ops import conductor, kubejobs

    names = conductor.cancel(kubejobs.KubeJobs(args.namespace), args.run, args.recipe_name)
    if not names:
        print(f"no Job of run {args.run!r} here", file=sys.stderr)
        return 1
    print("deleted: " + ", ".join(names))
    return 0


def _run_store(args: argparse.Namespace) -> Store:
    """The store of `--store`, reachable, holding the run `args.run` (exit 2 naming both otherwise)."""
    store = Store(args.store)
    store.check()
    if not store.fs.exists(store.path(args.run)):
        raise ConfigError(f"no run '{args.run}' in store {store.url} (check --store and the run name)")
    return store


def cmd_gc(args: argparse.Namespace) -> int:
    from hala.ops import gc

    store = _run_store(args)
    found = gc.collect(
        store, args.run, grace_s=args.grace, delete=args.delete, log=gc.QUIET if args.json else None
    )
    if args.json:
        print(
            json.dumps(
                {
                    "run": args.run,
                    "deleted": args.delete,
                    "files": [{"path": store.uri(p), "bytes": b, "reason": r} for p, b, r in found.files],
                    "bytes": found.bytes,
                    "busy": found.busy,
                    "younger_than_grace": found.young,
                },
                indent=2,
            )
        )
        return 0
    for path, size, reason in found.files:
        print(f"{'removed' if args.delete else 'garbage'}  {size:>12,}  {store.uri(path)}  ({reason})")
    print(
        f"{len(found.files)} files, {found.bytes / 1e6:.1f} MB "
        f"{'removed' if args.delete else 'no commit references'}"
        + ("" if args.delete or not found.files else f" (`hala gc {args.run} --delete` removes them)")
        + (f"; {found.young} younger than {args.grace:.0f} s kept" if found.young else "")
        + (f"; skipped while a writer holds them: {', '.join(found.busy)}" if found.busy else "")
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from hala.ops.gc import ARTIFACT_RUNS

    store = _run_store(args)
    names = args.steps
    if not names:
        info = store.read_json(store.path(args.run, "_RUN.json")) or {}
        names = [s["step"] for s in info.get("steps", [])]
    checked = files = 0
    for name in names:
        if store.read_manifest(args.run, name) is None:
            if args.steps:  # named: its absence is the answer
                raise ConfigError(
                    f"step '{name}' of run '{args.run}' is not committed in store {store.url} (no "
                    f"{name}/_MANIFEST.json)"
                )
            continue
        manifest = store.verify_step(args.run, name)
        checked += 1
        files += sum(len(o.get("files", [])) for o in manifest["outputs"].values())
    artifacts = 0
    for owner in ARTIFACT_RUNS:  # the store's content-addressed artifacts every run reads
        try:
            entries = store.fs.ls(store.path(owner), detail=False, refresh=True)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if store.read_manifest(owner, name) is not None:
                manifest = store.verify_step(owner, name)
                artifacts += 1
                files += sum(len(o.get("files", [])) for o in manifest["outputs"].values())
    logs.get("hala.verify").info("verified", run=args.run, steps=checked, artifacts=artifacts, files=files)
    if logs.console():
        print(
            f"verified: {checked} steps of run '{args.run}', {artifacts} artifacts "
            f"({', '.join(ARTIFACT_RUNS)}), {files} files"
        )
    return 0


def cmd_gather(args: argparse.Namespace) -> int:
    gather(args.recipe, args.step, args.store, args.run, args.set)
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    return envs.setup(args.envs or None, force=args.force)


def cmd_lock(args: argparse.Namespace) -> int:
    from hala.ops import locks

    variants = tuple(args.variant) if args.variant else locks.VARIANTS
    return locks.main_lock(args.sets or None, variants, check=args.check, force=args.force)


def cmd_test(args: argparse.Namespace) -> int:
    return envs.test(args.envs or None, args.pytest_args, jobs=args.jobs)


def cmd_report(args: argparse.Namespace) -> int:
    _write_report(Store(args.store), args.run, args.out)
    return 0


def _write_report(store: Store, run: str, out: str | None) -> None:
    from hala.ops import report

    page, md = report.write(store, run, out)
    if not out:  # in the store: its URL (s3://...), not the client's bucket-relative path
        page, md = store.uri(page), store.uri(md)
    logs.get("hala.report").info("report written", html=page, markdown=md)
    if logs.console():
        print(f"report: {page}")


def cmd_schema(args: argparse.Namespace) -> int:
    from hala.contract import schema

    return schema.main(args.stage, write=args.write, check_only=args.check)


def _overrides(p: argparse.ArgumentParser) -> None:
    """--set and --set-file, the same on every command that loads a recipe (see _load)."""
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE")
    p.add_argument(
        "--set-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a YAML file of STEP.KEY: VALUE overrides (the keys of --set); --set wins over it",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hala", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe (or plan it with --dry-run)")
    r.add_argument("recipe")
    r.add_argument("--store", help="artifact store URL or path (default: the recipe's)")
    r.add_argument("--run", help="run name (default: the recipe's)")
    _overrides(r)
    r.add_argument(
        "--only", nargs="+", metavar="STEP", help="run only these steps (their inputs must be committed)"
    )
    r.add_argument(
        "--force",
        nargs="?",
        action="append",
        const=runs.ALL,
        metavar="STEP",
        help="rerun even if cached: all steps, or the one named (repeatable)",
    )
    r.add_argument("--dry-run", action="store_true", help="print the plan; run and download nothing")
    r.add_argument(
        "--report", action="store_true", help="local runner: then write the run's report (`hala report RUN`)"
    )
    r.add_argument(
        "--keep-going", action="store_true", help="after a failure, still run steps that do not depend on it"
    )
    r.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    r.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="on a terminal: every step's log lines as they come (default: one line per step, logs in "
        "<run>/_logs/)",
    )
    r.add_argument(
        "--runner",
        choices=["local", "compose", "k8s"],
        default="local",
        help="local: each step in its .venvs/<set> (default); compose: the stage images, `docker compose "
        "up`; "
        "k8s: the conductor, one Job per step (runs inside the cluster, see manifests/)",
    )
    r.add_argument(
        "--variant", choices=["cpu", "cuda"], default="cpu", help="--runner compose/k8s: which images"
    )
    r.add_argument(
        "--namespace", help="--runner k8s: default the recipe's kubernetes.namespace or hala-<name>"
    )
    r.add_argument("--registry", help="--runner k8s: image registry (default $REGISTRY or local)")
    r.add_argument("--tag", help="--runner k8s: image tag (default $HALA_TAG or dev)")
    r.add_argument(
        "--timeout", type=float, default=7200, help="--runner compose: seconds before `up` is stopped"
    )
    r.add_argument(
        "--export", metavar="DIR", help="--runner compose: copy the store volume to this folder afterwards"
    )
    r.set_defaults(func=cmd_run)

    pn = sub.add_parser(
        "pin", help="write the commit of every unpinned hub input into the lock beside the recipe"
    )
    pn.add_argument("recipe")
    _overrides(pn)
    pn.set_defaults(func=cmd_pin)

    rec = sub.add_parser("record", help="write a run's header (_RUN.json) without running anything")
    rec.add_argument("recipe")
    rec.add_argument("--store")
    rec.add_argument("--run")
    _overrides(rec)
    rec.add_argument("--runner", default="compose", help="what runs the steps (recorded in _RUN.json)")
    rec.set_defaults(func=cmd_record)

    rn = sub.add_parser(
        "render",
        help="compose file, Kubernetes manifests (the conductor's), an Argo Workflow, or the Kueue queues "
        "of a recipe",
    )
    rn.add_argument("what", choices=["compose", "k8s", "argo", "kueue"])
    rn.add_argument("recipe", nargs="?")
    rn.add_argument(
        "--variant", choices=["cpu", "cuda"], default=None, help="default: cpu for compose, cuda for k8s"
    )
    rn.add_argument(
        "--registry", help="k8s: image registry written into the Jobs (default $REGISTRY or local)"
    )
    rn.add_argument("--tag", help="k8s: image tag (default $HALA_TAG or dev)")
    rn.add_argument(
        "--queue",
        help="k8s, argo: a Kueue LocalQueue (over the recipe's kubernetes.queue): Jobs carry its label "
        "and are created suspended until Kueue admits them",
    )
    rn.add_argument(
        "--store",
        help="the store the containers use: an object store URL (s3://, gs://) is passed to every "
        "service with its credentials' variables; a path means the shared volume (the default)",
    )
    rn.add_argument(
        "--run",
        help="the run (default: the recipe's); on Kubernetes its Jobs and conductor are named "
        "after it, so a second run of a recipe lives beside the first in one namespace",
    )
    _overrides(rn)
    rn.add_argument(
        "-o", "--out", help="compose: write to this file; k8s: write this folder (kustomization, jobs/)"
    )
    rn.set_defaults(func=cmd_render)

    im = sub.add_parser(
        "images", help="the stage images: list them, build them with docker, check what they import"
    )
    im.add_argument("action", choices=["list", "build", "check"])
    im.add_argument(
        "sets", nargs="*", metavar="SET", help="dependency sets (e.g. serve or hala-serve); default: all"
    )
    im.add_argument("--variant", choices=["cpu", "cuda"], default="cpu")
    im.add_argument(
        "--base",
        help="BASE_IMAGE for every image (default: local/debian:bookworm for cpu, the real bases for cuda)",
    )
    im.add_argument("--registry", help="default: $REGISTRY or local")
    im.add_argument("--tag", help="default: $HALA_TAG or dev (the variant is appended: dev-cpu)")
    im.add_argument("--json", action="store_true")
    im.set_defaults(func=cmd_images)

    s = sub.add_parser("steps", help="list the steps of a recipe in dependency order")
    s.add_argument("recipe")
    _overrides(s)
    s.add_argument(
        "--config",
        metavar="STEP",
        help="the effective config of one step, each value with where it came from",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_steps)

    st = sub.add_parser("status", help="state, rows and time of every step of a run")
    st.add_argument("run")
    st.add_argument("--store", default=DEFAULT_STORE)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    v = sub.add_parser("verify", help="re-hash committed outputs against their manifests")
    v.add_argument("run")
    v.add_argument("steps", nargs="*")
    v.add_argument("--store", default=DEFAULT_STORE)
    v.set_defaults(func=cmd_verify)

    gcp = sub.add_parser("gc", help="list (or remove) the files of a run that no commit references")
    gcp.add_argument("run")
    gcp.add_argument("--store", default=DEFAULT_STORE)
    gcp.add_argument("--delete", action="store_true", help="remove them (default: list them)")
    gcp.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="take only files at least this many seconds old (default 3600): a running writer's never",
    )
    gcp.add_argument("--json", action="store_true")
    gcp.set_defaults(func=cmd_gc)

    c = sub.add_parser(
        "cancel", help="delete a run's Kubernetes Jobs (its conductor's first), and no other run's"
    )
    c.add_argument("run")
    c.add_argument("-n", "--namespace", help="default: the kubeconfig context's (in a pod: its own)")
    c.add_argument(
        "--recipe-name", help="the recipe's name, when two recipes in the namespace have a run of that name"
    )
    c.set_defaults(func=cmd_cancel)

    g = sub.add_parser("gather", help="commit a sharded step from its shards' parts")
    g.add_argument("recipe")
    g.add_argument("step")
    g.add_argument("--store")
    g.add_argument("--run")
    g.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE")
    g.set_defaults(func=cmd_gather)

    se = sub.add_parser("setup", help="create or update the environments under .venvs/")
    se.add_argument("envs", nargs="*")
    se.add_argument("--force", action="store_true", help="reinstall even if up to date")
    se.set_defaults(func=cmd_setup)

    lk = sub.add_parser(
        "lock", help="resolve every dependency set into locks/<variant>/ with uv (= make lock)"
    )
    lk.add_argument("sets", nargs="*", metavar="SET")
    lk.add_argument("--variant", action="append", choices=["cpu", "cuda"], help="default: both")
    lk.add_argument(
        "--check", action="store_true", help="exit 1 naming every lock older than its requirement files"
    )
    lk.add_argument("--force", action="store_true", help="resolve again even where the inputs did not change")
    lk.set_defaults(func=cmd_lock)

    t = sub.add_parser("test", help="run each test suite in its environment")
    t.add_argument("envs", nargs="*")
    t.add_argument(
        "-j", "--jobs", type=int, help="suites at a time (default $HALA_TEST_JOBS, else one per core up to 2)"
    )
    t.set_defaults(pytest_args=[])  # after `--`: arguments for pytest (see main)
    t.set_defaults(func=cmd_test)

    rp = sub.add_parser("report", help="one HTML page (and a Markdown twin) about a run, from its manifests")
    rp.add_argument("run")
    rp.add_argument("--store", default=DEFAULT_STORE)
    rp.add_argument("--out", help="folder to write into (default: <store>/<run>/_report/)")
    rp.set_defaults(func=cmd_report)

    sc = sub.add_parser("schema", help="a stage's config JSON Schema, generated from its typed config")
    sc.add_argument("stage")
    sc.add_argument("--write", action="store_true", help="write stages/<stage>/config.schema.json")
    sc.add_argument("--check", action="store_true", help="exit 1 if the file differs from the typed config")
    sc.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `hala test [ENV ...] -- ARGS`: what follows `--` is pytest's (argparse would give it to ENV ...)
    passthrough: list[str] = []
    if argv[:1] == ["test"] and "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == "test":
        args.pytest_args = passthrough
    logs.setup()
    try:
        return int(args.func(args) or 0)
    except HalaError as e:
        _report(e, e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001
        code = exit_code_for(e)
        logs.get("hala").exception("failed", error=f"{type(e).__name__}: {e}")
        return code


def _report(e: BaseException, code: int) -> None:
    """People read stderr; log collectors read the JSON event on stdout."""
    print(f"hala: error (exit {code}): {e}", file=sys.stderr)
    if not sys.stdout.isatty():
        logs.get("hala").error("failed", exit_code=code, error=str(e))


if __name__ == "__main__":
    sys.exit(main())
