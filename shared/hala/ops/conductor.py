"""The Kubernetes conductor (`hala run --runner k8s`, the hala-conductor-<run> Job) and `hala cancel`.

It creates one Job per step in dependency order, only once the step's inputs are committed (no pod holds a GPU
while it waits), skips cached steps, follows Job conditions, gathers sharded steps after their Indexed Job,
and adopts the Jobs it finds after its own restart. Everything it touches is scoped to one run: Job names
carry the run (`k8s.job_name`), and a Job whose labels name another run or recipe is never adopted nor
deleted, so two runs of one recipe (`--run a`, `--run b`) complete side by side in one namespace.

A failed Job is not failed forever:

- exit 2 (config) or 3 (bad input) stops the run at once and says why: retrying will not help;
- any other failure (exit 75, a crash, an Indexed Job with an index past its pod retries) gets a new Job of
  the step, up to `kubernetes.retries` more (default 2), the n-th after `retry_backoff_seconds` * 2^(n-1)
  counted from the Job's Failed condition (default 30 s, at most 10 minutes); the attempt is the Job's
  `hala.dev/attempt` annotation and the run record's `attempts`, which `hala status` shows;
- a pod disruption (preemption, eviction, drain) counts against nothing: the Job's podFailurePolicy ignores
  it.

A conductor that ends a run with a failure writes it in the run record (`conductor.ended`, with its id: its
Job's uid, HALA_CONDUCTOR_ID from the downward API). The next conductor of that run, a reapplied one (another
Job, or a person's `hala run --runner k8s`), gives each step it finds failed a new budget of retries; a pod of
the same conductor Job (retried by its Job, or replaced in the middle of a run) goes on counting where the
last one was.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from hala.contract import logs
from hala.contract.errors import EXIT_CONFIG, EXIT_DATA, EXIT_TEMPORARY, ConfigError
from hala.contract.recipe import Recipe, Step, served_by
from hala.contract.store import Store, now
from hala.ops import k8s, runs
from hala.ops.drive import Outcome, Stopped, drive
from hala.ops.kubejobs import Conflict, Jobs, job_outcome

ATTEMPT = "hala.dev/attempt"  # 1, 2, ...: the how-many-th Job of the step in this run
# the attempt the current budget of retries started at (a reapply resets it)
BUDGET_FROM = "hala.dev/budget-from"
MAX_BACKOFF_S = 600.0
FINAL_CODES = (EXIT_CONFIG, EXIT_DATA)


def run_selector(recipe: Recipe) -> str:
    """The label selector of a run's Jobs (every step, shard and gather Job carries these labels)."""
    return f"app.kubernetes.io/part-of={k8s.k8s_name(recipe.name)},hala.dev/run={k8s.k8s_name(recipe.run)}"


def _meta(job: dict[str, Any], key: str) -> dict[str, str]:
    return (job.get("metadata") or {}).get(key) or {}


def _is_ours(job: dict[str, Any], recipe: Recipe) -> bool:
    labels = _meta(job, "labels")
    return labels.get("hala.dev/run") == k8s.k8s_name(recipe.run) and labels.get(
        "app.kubernetes.io/part-of"
    ) == k8s.k8s_name(recipe.name)


def _failure_code(store: Store, recipe: Recipe, step: Step) -> tuple[int, str]:
    """The exit code and error the step (or its failed shard) wrote into the store when it stopped; 1 when
    none did (a pod killed before it could)."""
    statuses = store.read_statuses(recipe.run)
    candidates = [statuses.get(step.name, {})] + [
        v for k, v in sorted(statuses.items()) if store.is_shard_of(k, step.name) and v.get("exit_code")
    ]
    status = next((c for c in candidates if c.get("exit_code") and c.get("state") == "failed"), {})
    return int(status.get("exit_code") or 1), str(status.get("error") or "")


def _record(store: Store, recipe: Recipe, **changes: Any) -> None:
    """Merge `changes` into the run record (<run>/_RUN.json); `attempts` is merged per step."""
    path = store.path(recipe.run, "_RUN.json")
    info = store.read_json(path) or {}
    if "attempts" in changes:
        changes["attempts"] = {**(info.get("attempts") or {}), **changes["attempts"]}
    info.update(changes)
    store.write_json(path, info)


def conduct(
    recipe: Recipe,
    jobs: Jobs,
    *,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
    resync_seconds: float = 300.0,
    recipe_arg: str | None = None,
    store_arg: str | None = None,
    max_polls: int | None = None,
) -> int:
    """Drive the recipe's enabled steps as Jobs until all are committed, or one fails for good (exit code !=
    0)."""
    log = logs.get("hala.k8s")
    store = Store(recipe.store)
    info = store.read_json(store.path(recipe.run, "_RUN.json"))
    if info is None:
        runs.record(recipe, store, runner_name="k8s")
        info = {}
    # Which conductor this is: its Job's uid in a cluster (the conductor Job's pods retry it: a retried pod is
    # the same conductor and must not reset budgets); a process of its own anywhere else (a person ran it
    # again)
    me = os.environ.get("HALA_CONDUCTOR_ID") or f"process-{uuid.uuid4().hex[:12]}"
    last = info.get("conductor") or {}
    started, t0 = now(), time.monotonic()
    _record(store, recipe, conductor={"id": me, "started": started, "ended": None})
    steps = [s for s in recipe.steps.values() if s.enabled]
    missing = [f"{s.name} ({s.stage})" for s in steps if s.spec is None]
    if missing:
        raise ConfigError(f"steps whose stage is not built: {', '.join(missing)}")
    executor = JobExecutor(
        recipe,
        store,
        jobs,
        log,
        reapplied=last.get("ended") == "failed" and last.get("id") != me,
        job_args={
            "variant": variant,
            "registry": registry,
            "tag": tag,
            "recipe_arg": recipe_arg,
            "store_arg": store_arg,
        },
        resync_seconds=resync_seconds,
        max_polls=max_polls,
    )
    executor.selected = {s.name for s in steps}
    try:
        # at the first failure the conductor ends: Jobs still running finish on their own, a rerun adopts them
        outcomes = drive(recipe, steps, store, executor, detach_on_failure=True, wait_seconds=resync_seconds)
    except Stopped:
        return EXIT_TEMPORARY  # the caller (a test, or a pod being replaced) comes back and adopts what runs
    # the local runner's summary
    runs.summarize(recipe, store, outcomes, started, seconds=time.monotonic() - t0)
    failure = next((o for o in outcomes.values() if o.state == "failed"), None)
    _record(
        store,
        recipe,
        conductor={"id": me, "started": started, "ended": "failed" if failure else "done", "at": now()},
    )
    return (failure.exit_code or 1) if failure else 0


class JobExecutor:
    """hala.ops.drive's executor on a cluster: a step is a Job (an Indexed Job when sharded). `poll` reads it,
    adopts it after a restart, replaces a stale one of this run, retries a failed one within its budget, and
    reports only what is final; `wait` waits on the watch API, at most until the soonest retry is due."""

    def __init__(
        self,
        recipe: Recipe,
        store: Store,
        jobs: Jobs,
        log: Any,
        *,
        reapplied: bool,
        job_args: dict[str, Any],
        resync_seconds: float,
        max_polls: int | None,
    ):
        self.recipe, self.store, self.jobs, self.log = recipe, store, jobs, log
        self.reapplied, self.job_args = reapplied, job_args
        self.resync_seconds, self.max_polls, self.polls = resync_seconds, max_polls, 0
        self.retries = int(recipe.kubernetes.get("retries", 2))
        self.backoff_s = float(recipe.kubernetes.get("retry_backoff_seconds", 30))
        self.fingerprints: dict[str, str | None] = {}
        self.looked: set[str] = set()  # steps this conductor has seen a Job of
        self.adopted: set[str] = set()
        # step -> (attempt, budget-from) of the Job to create
        self.next_attempt: dict[str, tuple[int, int]] = {}
        self.wake: float | None = None  # the soonest retry, when one is backing off
        self.served_up: set[str] = set()  # served models this conductor scaled up
        self.ended_steps: set[str] = set()
        self.selected: set[str] = set()  # the run's steps (set by conduct)

    def start(self, step: Step, fingerprint: str | None, forced: bool) -> None:
        self.fingerprints[step.name] = fingerprint  # the Job is created or adopted by the next poll
        uses = served_by(step)
        if uses is not None and uses not in self.served_up:
            # its served model, scaled up for its first user (its Jobs wait for the Service themselves)
            replicas = self.recipe.served[uses].replicas or 1
            self.jobs.scale(k8s.served_name(self.recipe, uses), replicas)
            self.served_up.add(uses)
            self.log.info("served scaled", served=uses, replicas=replicas)

    def served_down(self, ended: set[str], selected: set[str]) -> None:
        """A served model none of whose selected users is left to run goes back to zero replicas (its GPUs
        free)."""
        for name in sorted(self.served_up):
            users = [u for u in self.recipe.served[name].users if u in selected]
            if all(u in ended for u in users):
                self.jobs.scale(k8s.served_name(self.recipe, name), 0)
                self.served_up.discard(name)
                self.log.info("served scaled", served=name, replicas=0)

    def poll(self, step: Step) -> tuple[int, str] | None:
        fp, name = self.fingerprints[step.name], k8s.job_name(self.recipe, step)
        job = self.jobs.get(name)
        if job is not None and not _is_ours(job, self.recipe):
            labels = _meta(job, "labels")
            return EXIT_CONFIG, (
                f"Job {name} belongs to run {labels.get('hala.dev/run')!r} of "
                f"{labels.get('app.kubernetes.io/part-of')!r}, not to this one; it is left alone: "
                "rename this run (--run) or delete that Job"
            )
        if job is not None and _meta(job, "annotations").get(k8s.FINGERPRINT) != fp:
            # this run's Job of an older config (a --set changed): its pods write what this run no longer
            # wants
            self.log.warning("replacing a stale job", step=step.name, job=name)
            self.jobs.delete(name)
            job = None
        if job is None:
            self._create(step, name, fp)
            return None
        first_look = step.name not in self.looked
        self.looked.add(step.name)
        if step.name not in self.adopted:
            self.adopted.add(step.name)
            self.log.info("job adopted", step=step.name, job=name)
        outcome, reason, failed_at = job_outcome(job)
        if outcome == "running":
            return None
        if outcome == "complete":
            self.log.info("job complete", step=step.name, job=name)
            return 0, ""
        return self._failed(step, name, job, reason, failed_at, first_look)

    def _create(self, step: Step, name: str, fp: str | None) -> None:
        attempt, budget_from = self.next_attempt.get(step.name, (1, 1))
        a = self.job_args
        try:
            self.jobs.create(
                k8s.step_job(
                    self.recipe,
                    step,
                    a["variant"],
                    a["registry"],
                    a["tag"],
                    fingerprint=fp,
                    recipe_arg=a["recipe_arg"],
                    store_arg=a["store_arg"],
                    annotations={ATTEMPT: str(attempt), BUDGET_FROM: str(budget_from)},
                )
            )
            self.log.info(
                "job created",
                step=step.name,
                job=name,
                shards=step.shards,
                attempt=attempt,
                fingerprint=(fp or "")[:12],
            )
            _record(self.store, self.recipe, attempts={step.name: attempt})
            self.next_attempt.pop(step.name, None)
        except Conflict:
            self.log.info("job still being deleted", step=step.name, job=name)  # tried again at the next pass
        self.looked.add(step.name)
        self.adopted.add(step.name)

    def _failed(
        self,
        step: Step,
        name: str,
        job: dict[str, Any],
        reason: str,
        failed_at: float | None,
        first_look: bool,
    ) -> tuple[int, str] | None:
        code, error = _failure_code(self.store, self.recipe, step)
        why = "; ".join(x for x in (reason, error) if x) or "the Job failed"
        attempt = int(_meta(job, "annotations").get(ATTEMPT, 1))
        budget_from = int(_meta(job, "annotations").get(BUDGET_FROM, 1))
        if self.reapplied and first_look:
            # reapplied after the run failed: the failed step gets its retries again
            budget_from = attempt + 1
        if code in FINAL_CODES or attempt + 1 - budget_from > self.retries:
            self.log.error(
                "job failed",
                step=step.name,
                job=name,
                exit_code=code,
                attempt=attempt,
                reason=why,
                retried=code not in FINAL_CODES,
            )
            return code, why
        due = (failed_at or time.time()) + min(
            MAX_BACKOFF_S, self.backoff_s * 2 ** max(0, attempt - budget_from)
        )
        if time.time() < due:
            self.wake = due if self.wake is None else min(self.wake, due)
            return None
        self.log.warning(
            "job failed, retrying",
            step=step.name,
            job=name,
            exit_code=code,
            attempt=attempt,
            next_attempt=attempt + 1,
            retries_left=self.retries - (attempt + 1 - budget_from),
            reason=why,
        )
        self.jobs.delete(name)
        self.next_attempt[step.name] = (attempt + 1, budget_from)
        return None

    def wait(self, seconds: float) -> None:
        self.polls += 1
        if self.max_polls is not None and self.polls >= self.max_polls:
            self.log.info("conductor stopping", after_polls=self.polls)
            raise Stopped
        if self.wake is not None:
            seconds = max(0.0, min(seconds, self.wake - time.time()))
            self.wake = None
        self.jobs.wait(seconds)  # returns when a Job changes (the watch API), at the latest after `seconds`

    def ended(self, o: Outcome) -> None:
        self.ended_steps.add(o.step)
        if self.served_up:
            self.served_down(self.ended_steps, self.selected)
        if o.state == "cached":
            self.log.info("cached", step=o.step, fingerprint=(o.fingerprint or "")[:12])
        elif o.state == "done":
            self.log.info("step done", step=o.step)
        elif o.state in ("failed", "blocked"):
            self.log.info(o.state, step=o.step, exit_code=o.exit_code, note=o.note or None)


def cancel(jobs: Jobs, run: str, recipe_name: str | None = None) -> list[str]:
    """Delete the Jobs of one run (its conductor's included, so nothing creates them again): those labelled
    with the run, of one recipe. The names deleted. A run name that two recipes in the namespace share needs
    `recipe_name`."""
    selector = f"app.kubernetes.io/name=hala,hala.dev/run={k8s.k8s_name(run)}"
    if recipe_name:
        selector += f",app.kubernetes.io/part-of={k8s.k8s_name(recipe_name)}"
    found = jobs.list(selector)
    recipes = sorted({_meta(j, "labels").get("app.kubernetes.io/part-of", "") for j in found})
    if len(recipes) > 1:
        raise ConfigError(
            f"run {run!r} has Jobs of {len(recipes)} recipes here ({', '.join(recipes)}): "
            "name one with --recipe-name"
        )
    # the conductor first: a conductor still running would create the step Jobs again
    names = sorted((j["metadata"]["name"] for j in found), key=lambda n: not n.startswith(k8s.CONDUCTOR))
    for name in names:
        jobs.delete(name)
    return names
