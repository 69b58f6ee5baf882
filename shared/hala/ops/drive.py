"""The one loop every runner runs: `drive(recipe, steps, store, executor)` walks the scheduler
(hala.ops.schedule) until each step is final, and an executor only starts steps and says when they ended.

    class MyExecutor:  # a new runner (Slurm, Ray, a cloud batch service) is this and nothing else
        def start(self, step, fingerprint, forced): ...  # begin the step (all its shards), or run it through
        def poll(self, step): ...  # None while it runs, else (exit code, note)
        def wait(self, seconds): ...  # until something may have changed
        def ended(self, outcome): ...  # every final outcome (cached, done, failed, blocked, skipped)

What the loop owns, for every executor: the next move of each step (go, wait for inputs, blocked by a failed
input, skipped after the first failure), the cache decision (read ahead by `schedule.probe` while every
upstream step was cached), gathering a sharded step after its shards, and the post-commit check (a step that
exited 0 must have left a manifest). The local runner (hala.ops.runner) and the Kubernetes conductor
(hala.ops.conductor) are executors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from hala.contract.errors import EXIT_CONFIG, EXIT_OK, HalaError
from hala.contract.recipe import Recipe, Step
from hala.contract.store import Store
from hala.ops import schedule
from hala.ops.gather import gather_step


@dataclass
class Outcome:
    step: str
    state: str  # cached | done | failed | blocked | skipped
    seconds: float = 0.0
    exit_code: int | None = None
    rows: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    fingerprint: str | None = None  # of a cached step (what its manifest was committed under)


class Executor(Protocol):
    def start(self, step: Step, fingerprint: str | None, forced: bool) -> None: ...
    def poll(self, step: Step) -> tuple[int, str] | None: ...
    def wait(self, seconds: float) -> None: ...
    def ended(self, outcome: Outcome) -> None: ...


class Stopped(Exception):
    """The executor gave up waiting (a conductor pod being replaced): what runs goes on without this
    process."""


def rows_of(manifest: dict[str, Any] | None) -> dict[str, Any]:
    return {name: out.get("rows") for name, out in (manifest or {}).get("outputs", {}).items()}


def drive(
    recipe: Recipe,
    steps: list[Step],
    store: Store,
    executor: Executor,
    *,
    force: list[str] | None = None,
    keep_going: bool = False,
    detach_on_failure: bool = False,
    wait_seconds: float = 0.0,
    probed: dict[str, schedule.State] | None = None,
) -> dict[str, Outcome]:
    """Every step of `steps` to a final outcome (in the order of `steps`, which is a dependency order).

    `keep_going`: after a failure, steps that do not depend on it still run. `detach_on_failure`: at the first
    failure the loop ends at once, leaving what runs to finish on its own (Jobs on a cluster); otherwise it
    waits for them."""
    outcomes: dict[str, Outcome] = {}
    running: dict[str, float] = {}  # step -> when it started
    tracked = {s.name for s in steps}
    while True:
        for step in steps:
            if step.name in outcomes:
                continue
            # nothing new starts
            stopped = not keep_going and any(o.state == "failed" for o in outcomes.values())
            if step.name not in running and not _begin(
                recipe,
                step,
                store,
                executor,
                outcomes,
                running,
                tracked,
                stopped=stopped,
                force=force,
                probed=probed,
            ):
                continue
            ended = executor.poll(step)
            if ended is None:
                continue
            code, note = ended
            seconds = time.monotonic() - running.pop(step.name)
            if code == EXIT_OK and step.shards > 1:
                try:
                    gather_step(recipe, step.name)
                except HalaError as e:
                    code, note = e.exit_code, f"gather: {e}"
            manifest = store.read_manifest(recipe.run, step.name)
            if code == EXIT_OK and manifest is None:
                code, note = EXIT_CONFIG, "the step exited 0 but left no manifest"
            _final(
                executor,
                outcomes,
                Outcome(
                    step.name, "done" if code == EXIT_OK else "failed", seconds, code, rows_of(manifest), note
                ),
            )
        failed = any(o.state == "failed" for o in outcomes.values())
        if failed and detach_on_failure and not keep_going:
            return outcomes
        if len(outcomes) == len(steps):
            return outcomes
        executor.wait(wait_seconds)


def _final(executor: Executor, outcomes: dict[str, Outcome], outcome: Outcome) -> None:
    outcomes[outcome.step] = outcome
    executor.ended(outcome)


def _begin(
    recipe: Recipe,
    step: Step,
    store: Store,
    executor: Executor,
    outcomes: dict[str, Outcome],
    running: dict[str, float],
    tracked: set[str],
    *,
    stopped: bool,
    force: list[str] | None,
    probed: dict[str, schedule.State] | None,
) -> bool:
    """Decide a step that is not running: True when it was started (poll it), False when it waits or was
    decided."""
    states = {name: o.state for name, o in outcomes.items()} | {name: "running" for name in running}
    move, why = schedule.next_move(recipe, step, states, tracked, stopped=stopped)
    if move == "blocked":
        _final(executor, outcomes, Outcome(step.name, "blocked", note=f"after failed {', '.join(why)}"))
        return False
    if move == "skip":
        _final(executor, outcomes, Outcome(step.name, "skipped", note="run stopped at the first failure"))
        return False
    if move != "go":
        return False
    forced = schedule.is_forced(step, force)
    try:
        ahead = (probed or {}).get(step.name)
        # read ahead before any step ran: still true while every upstream step of this run was cached too
        if (
            ahead
            and ahead[0] == "cached"
            and all(outcomes[u].state == "cached" for u in step.upstream if u in outcomes)
        ):
            state, fp, manifest = ahead
        else:
            state, fp, manifest = schedule.state(store, recipe, step, forced)
    except HalaError as e:
        _final(executor, outcomes, Outcome(step.name, "failed", exit_code=e.exit_code, note=str(e)))
        return False
    if state == "cached":
        _final(executor, outcomes, Outcome(step.name, "cached", rows=rows_of(manifest), fingerprint=fp))
        return False
    running[step.name] = time.monotonic()
    executor.start(step, fp, forced)
    return True
