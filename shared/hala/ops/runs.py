"""The run seam every runner shares: which steps a run selects, what it would do (`hala run --dry-run`), its
record (<store>/<run>/_RUN.json), its summary, and its status read back from the store (`hala status`, the
report).

The loop that runs the steps is hala.ops.drive; how a step is started is each runner's executor
(hala.ops.runner on this machine, hala.ops.conductor on Kubernetes; compose renders the same steps as
services).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hala.contract import logs
from hala.contract.errors import ConfigError
from hala.contract.recipe import Recipe, Step
from hala.contract.store import Store, now
from hala.ops import display, envs, schedule
from hala.ops.drive import Outcome, rows_of

ALL = schedule.ALL


def select(recipe: Recipe, only: list[str] | None) -> list[Step]:
    if only:
        for name in only:
            recipe.step(name)  # exit 2 with a suggestion for a misspelt name
        return [s for s in recipe.steps.values() if s.name in only]
    return [s for s in recipe.steps.values() if s.enabled]


def check_runnable(recipe: Recipe, steps: list[Step]) -> None:
    missing = sorted({s.stage for s in steps if s.spec is None})
    if missing:
        names = [s.name for s in steps if s.spec is None]
        raise ConfigError(
            f"stage(s) {', '.join(missing)} do not exist yet (no stages/<name>/stage.toml); steps that need "
            "them: "
            f"{', '.join(names[:8])}{' …' if len(names) > 8 else ''}. Run the others with --only, or plan "
            "with --dry-run"
        )
    for env in sorted({s.spec.env for s in steps if s.spec}):
        if not envs.python_for(env).exists() and not os.environ.get("HALA_SINGLE_ENV"):
            raise ConfigError(
                f"environment '{env}' is missing ({envs.python_for(env)}); run `make setup` (or `hala setup "
                f"{env}`)"
            )


def plan(
    recipe: Recipe, only: list[str] | None = None, force: list[str] | None = None
) -> list[dict[str, Any]]:
    """What `hala run` would do, without running or downloading anything."""
    store = Store(recipe.store)
    chosen = {s.name for s in select(recipe, only)}
    rows = []
    for step in recipe.steps.values():
        item = {
            "step": step.name,
            "stage": step.stage,
            "shards": step.shards,
            "inputs": {k: v.describe() for k, v in step.inputs.items()},
        }
        if step.name not in chosen:
            item["state"] = "disabled" if not step.enabled else "not selected"
        elif step.spec is None:
            item["state"] = "stage missing"
        else:
            item["state"] = {
                "waiting": "will run (after its inputs)",
                "run": "will run",
                "cached": "cached",
                "unpinned": "will run (a hub input is not pinned: see the warning)",
            }[schedule.state(store, recipe, step, schedule.is_forced(step, force), planning=True)[0]]
        rows.append(item)
    return rows


def served_plan(recipe: Recipe, only: list[str] | None = None) -> list[dict[str, Any]]:
    """The served models `hala run` would start: each one a selected step sends its requests to, with the
    model it serves, its server and those steps in run order (a run whose users are all cached starts
    none)."""
    chosen = {s.name for s in select(recipe, only)}
    rows = []
    for name, entry in recipe.served.items():
        users = [u for u in entry.users if u in chosen]
        if users:
            rows.append(
                {
                    "served": name,
                    "model": entry.model.describe(),
                    "server": "command: " + " ".join(entry.command[:2])
                    if entry.command
                    else "vllm (OpenAI server)",
                    "replicas": entry.replicas,
                    "users": users,
                }
            )
    return rows


def record(recipe: Recipe, store: Store, runner_name: str = "local") -> str:
    """The run's header, <store>/<run>/_RUN.json: what `hala status` and the report read. Container runners
    (compose, Kubernetes) write it from their first service or Job (`hala record`)."""
    started = now()
    store.write_json(
        store.path(recipe.run, "_RUN.json"),
        {
            "recipe": str(recipe.path),
            "name": recipe.name,
            "run": recipe.run,
            "store": recipe.store,
            "started": started,
            "runner": runner_name,
            "overrides": recipe.overrides,
            "steps": [
                {
                    "step": s.name,
                    "stage": s.stage,
                    "shards": s.shards,
                    "inputs": {k: v.describe() for k, v in s.inputs.items()},
                }
                for s in recipe.steps.values()
            ],
        },
    )
    return started


def summarize(
    recipe: Recipe,
    store: Store,
    outcomes: dict[str, Outcome],
    started: str,
    view: display.Display | None = None,
    seconds: float = 0.0,
) -> None:
    log = logs.get("hala.run")
    run_file = store.path(recipe.run, "_RUN.json")
    info = store.read_json(run_file) or {}
    info.update(finished=now(), outcomes={k: vars(v) for k, v in outcomes.items()})
    store.write_json(run_file, info)
    if view is not None:
        counts: dict[str, int] = {}
        for o in outcomes.values():
            counts[o.state] = counts.get(o.state, 0) + 1
        print(
            f"{len(outcomes)} steps in {seconds:.1f} s: "
            + ", ".join(f"{n} {state}" for state, n in counts.items())
            + f"; store {store.uri(store.path(recipe.run))}, logs in _logs/",
            flush=True,
        )
    elif logs.console():
        print(
            logs.table(
                [
                    {
                        "step": o.step,
                        "state": o.state,
                        "seconds": f"{o.seconds:.1f}",
                        "exit": o.exit_code,
                        "rows": ", ".join(f"{k}={v}" for k, v in o.rows.items()),
                    }
                    for o in outcomes.values()
                ],
                ["step", "state", "seconds", "exit", "rows"],
            ),
            flush=True,
        )
    else:
        for o in outcomes.values():
            log.info(
                "summary",
                step=o.step,
                state=o.state,
                seconds=round(o.seconds, 1),
                exit_code=o.exit_code,
                rows=o.rows or None,
                note=o.note or None,
            )
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o.state] = counts.get(o.state, 0) + 1
    log.info("run end", **counts, store=store.uri(store.path(recipe.run)))
    for o in outcomes.values():  # people read stderr: say plainly what failed and why
        if o.state == "failed":
            print(
                f"hala: step {o.step} failed (exit {o.exit_code}){': ' + o.note if o.note else ''}",
                file=sys.stderr,
            )


def status(store: Store, run: str) -> list[dict[str, Any]]:
    """State, rows and time of every step of a run, from the store alone."""
    info = store.read_json(store.path(run, "_RUN.json"))
    if info is None:
        raise ConfigError(f"no run '{run}' in store {store.url} (no {run}/_RUN.json)")
    statuses = store.read_statuses(run)
    rows = []
    for entry in info["steps"]:
        name = entry["step"]
        manifest = store.read_manifest(run, name)
        st = statuses.get(name, {})
        outcome = (info.get("outcomes") or {}).get(name, {})
        if manifest is not None:
            state = "committed"
        elif st.get("state") in ("running", "failed", "blocked"):
            state = st["state"]
        else:
            shards = {k: v for k, v in statuses.items() if store.is_shard_of(k, name)}
            state = (
                f"shards {sum(v.get('state') == 'done' for v in shards.values())}/{entry.get('shards', 1)} "
                "done"
                if shards
                else "not run"
            )
        rows.append(
            {
                "step": name,
                "stage": entry["stage"],
                "state": state,
                "cached": outcome.get("state") == "cached",
                "rows": rows_of(manifest),
                "counts": (manifest or {}).get("counts"),
                "seconds": (manifest or {}).get("timings", {}).get("seconds", st.get("seconds")),
                "exit_code": st.get("exit_code"),
                "error": st.get("error") if state == "failed" else None,
                "attempts": (info.get("attempts") or {}).get(name),  # Jobs the conductor created for it
            }
        )
    return rows
