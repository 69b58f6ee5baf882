"""The local runner: every step as a subprocess in its stage's environment, in dependency order.

It runs exactly the step command the containers and Kubernetes Jobs run
(`python -m stages.<stage> --recipe R --step S ...`), with the Python of `.venvs/<env>/`. It decides
only what runs where: cached steps are skipped without starting a process, a sharded step runs its
shards and then `hala gather` in-process, a failed step stops what depends on it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

from hala.contract import logs
from hala.contract.errors import EXIT_OK, ConfigError, HalaError
from hala.contract.recipe import Recipe, Step
from hala.contract.store import Store
from hala.ops import commands, display, envs, runs, schedule, served
from hala.ops.drive import Outcome, drive


def _python(step: Step) -> str:
    assert step.spec is not None
    if os.environ.get("HALA_SINGLE_ENV"):
        return sys.executable  # inside an image: one environment holds everything this process runs
    return str(envs.python_for(step.spec.env))


def step_command(
    recipe: Recipe, step: Step, shard: tuple[int, int] | None = None, force: bool = False
) -> list[str]:
    assert step.spec is not None
    return [
        _python(step),
        "-m",
        step.spec.module,
        *commands.step_flags(recipe, step, shard, recipe.store, str(recipe.path), force),
    ]


class _Relay:
    """Shows a child's JSON log lines on this terminal (readable) or passes them on (JSON), and keeps them."""

    def __init__(self, view: display.Display | None = None, shard: str | None = None) -> None:
        self.view, self.shard = view, shard
        self.json = not sys.stdout.isatty() or os.environ.get("HALA_LOG_FORMAT") == "json"
        self.bars: dict[str, Any] = {}
        self.lines: list[str] = []
        self.error: str | None = None  # the child's own account of why it failed
        if not self.json and view is None:
            import structlog

            self.render = structlog.dev.ConsoleRenderer(colors=True, sort_keys=False)

    def line(self, text: str, label: str) -> None:
        text = text.rstrip("\n")
        if not text:
            return
        self.lines.append(text)
        try:
            event = json.loads(text)
            if not isinstance(event, dict) or "event" not in event:
                raise ValueError
        except ValueError:
            event = {"event": text, "level": "info", "step": label, "raw": True}
            if self.json:
                print(json.dumps(event, ensure_ascii=False), flush=True)
                return
        if event.get("event") == "failed" and event.get("error"):
            self.error = str(event["error"])
        if self.view is not None:  # the display shows progress; everything else is in the step's log file
            if event.get("event") == "progress":
                self.view.progress(event, self.shard)
            return
        if self.json:
            print(text, flush=True)
            return
        if event.get("event") == "progress" and sys.stderr.isatty():
            self._bar(event, label)
            return
        event.pop("logger", None)
        print(self.render(None, event.get("level", "info"), dict(event)), flush=True)

    def _bar(self, event: dict[str, Any], label: str) -> None:
        from tqdm import tqdm

        key = f"{label}:{event.get('what')}"
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(
                total=event.get("total"), desc=label, unit=f" {event.get('unit', 'rows')}", leave=False
            )
        bar.n = event.get("done", 0)
        bar.refresh()
        if event.get("final"):
            bar.close()
            del self.bars[key]


def child_env(view: display.Display | None = None) -> dict[str, str]:
    """The environment of every step process (and of the warm interpreters they are forked from)."""
    env = dict(os.environ)
    env.update(
        HALA_LOG_FORMAT="json",
        HALA_PROGRESS_BAR="0",
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    if view is not None:
        env.setdefault("HALA_PROGRESS_EVERY", "0.5")  # the bar moves; the events stay in the step's log file
    return env


class WarmPool:
    """One warm interpreter (hala.kit.warm) per environment the run's remaining steps need, started one step
    ahead so that its imports overlap the step before, and ended once no later step needs it. HALA_WARM=0:
    none."""

    def __init__(self, steps: list[Step], view: display.Display | None):
        self.enabled = os.environ.get("HALA_WARM", "1") != "0" and not os.environ.get("HALA_SINGLE_ENV")
        self.order = [s.spec.env for s in steps if s.spec is not None]
        self.env = child_env(view)
        self.servers: dict[str, Any] = {}
        self.sets = envs.env_sets() if self.enabled else {}

    def _start(self, name: str) -> Any:
        from hala.kit import warm

        if name not in self.servers and name in self.sets:
            self.servers[name] = warm.Server(str(envs.python_for(name)), self.sets[name].warm, self.env)
        return self.servers.get(name)

    def running(self, index: int) -> None:
        """Step `index` of the run is about to run: its environment's server, and the next two other ones'."""
        if not self.enabled:
            return
        self._start(self.order[index])
        for name in list(dict.fromkeys(e for e in self.order[index + 1 :] if e != self.order[index]))[:2]:
            self._start(name)

    def popen(self, cmd: list[str], env: dict[str, str]) -> Any:
        """A warm child for `cmd` (python -m MODULE of a set's environment), or None: then a plain process."""
        from hala.kit import warm

        name = next((n for n in self.servers if str(envs.python_for(n)) == cmd[0]), None)
        server = self.servers.get(name) if name else None
        if server is None or not server.ready():
            return None
        try:
            return server.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except warm.Refused:
            return None
        except OSError as e:
            logs.get("hala.run").warning(
                "warm interpreter failed; a plain process instead", env=name, error=str(e)
            )
            return None

    def finished(self, index: int) -> None:
        """Step `index` is over: a server no later step needs is ended (its memory goes back)."""
        for name in list(self.servers):
            if name not in self.order[index + 1 :]:
                self.servers.pop(name).close()

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()


def _spawn(
    cmd: list[str],
    label: str,
    store: Store,
    run: str,
    log_name: str,
    view: display.Display | None = None,
    shard: str | None = None,
    warm: WarmPool | None = None,
) -> tuple[int, str | None]:
    env = child_env(view)
    relay = _Relay(view, shard)
    proc = warm.popen(cmd, env) if warm is not None else None
    if proc is None:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1
        )
    with proc:
        assert proc.stdout is not None
        try:
            for text in proc.stdout:
                relay.line(text, label)
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=30)
            raise
        finally:
            _save_log(store, run, log_name, relay.lines)
    return code, relay.error


def _save_log(store: Store, run: str, name: str, lines: list[str]) -> None:
    """Each step's log, kept in the store next to its outputs (<run>/_logs/<step>.jsonl)."""
    path = store.path(run, "_logs", f"{name}.jsonl")
    try:
        store.fs.makedirs(store.path(run, "_logs"), exist_ok=True)
        store.fs.pipe(path, ("\n".join(lines) + "\n").encode())
    except Exception as e:  # noqa: BLE001 - a log that could not be saved must not hide the step's result
        logs.get("hala.run").warning("log not saved", path=store.uri(path), error=str(e))


def run(
    recipe: Recipe,
    only: list[str] | None = None,
    force: list[str] | None = None,
    keep_going: bool = False,
    verbose: bool = False,
) -> int:
    log = logs.get("hala.run")
    logs.bind(run=recipe.run)
    steps = runs.select(recipe, only)
    view = display.Display([s.name for s in steps]) if display.wanted(verbose, not logs.console()) else None
    if view is not None:
        logging.getLogger().setLevel(logging.WARNING)  # the display says what the info events would say
    warm = WarmPool(steps, view)
    store = Store(recipe.store)
    pool = served.Pool(recipe, store, [s.name for s in steps], _python, log)
    try:
        return _run(recipe, steps, store, force, keep_going, log, view, warm, pool)
    finally:
        pool.close()
        warm.close()
        if view is not None:
            view.close()


def _run(
    recipe: Recipe,
    steps: list[Step],
    store: Store,
    force: list[str] | None,
    keep_going: bool,
    log: Any,
    view: display.Display | None,
    warm: WarmPool,
    pool: served.Pool,
) -> int:
    runs.check_runnable(recipe, steps)
    if "memory" in store.fs.protocol:  # a str or a tuple of names
        raise ConfigError(
            "a memory:// store lives inside one process; the runner starts one per step: use a path or "
            "s3://, gs://"
        )
    store.check()
    started = runs.record(recipe, store)
    t_run = time.monotonic()
    log.info("run start", recipe=str(recipe.path), store=recipe.store, steps=len(steps))
    probed = schedule.probe(store, recipe, steps, force)
    executor = LocalExecutor(recipe, store, steps, log, view, warm, pool)
    outcomes = drive(recipe, steps, store, executor, force=force, keep_going=keep_going, probed=probed)
    runs.summarize(recipe, store, outcomes, started, view, time.monotonic() - t_run)
    return next((o.exit_code or 1 for o in outcomes.values() if o.state == "failed"), EXIT_OK)


class LocalExecutor:
    """hala.ops.drive's executor on this machine: a step runs to its end inside `start` (its shards one after
    the other, each a process of its stage's environment, warm when one is ready), so `poll` has its exit code
    at once."""

    def __init__(
        self,
        recipe: Recipe,
        store: Store,
        steps: list[Step],
        log: Any,
        view: display.Display | None,
        warm: WarmPool,
        pool: served.Pool | None = None,
    ):
        self.recipe, self.store, self.log, self.view, self.warm = recipe, store, log, view, warm
        self.pool = pool
        self.index = {s.name: i for i, s in enumerate(steps)}
        self.results: dict[str, tuple[int, str]] = {}

    def start(self, step: Step, fingerprint: str | None, forced: bool) -> None:
        self.log.info("step start", step=step.name, stage=step.stage, shards=step.shards)
        if self.view:
            self.view.start(step.name)
        self.warm.running(self.index[step.name])
        try:
            if self.pool is not None:
                self.pool.before(step)  # its served model, started once for all the steps that use it
        except HalaError as e:
            self.results[step.name] = (e.exit_code, str(e))
            return
        code, note = _run_step(self.recipe, step, self.store, forced, self.view, self.warm)
        self.warm.finished(self.index[step.name])
        self.results[step.name] = (code, note or "")

    def poll(self, step: Step) -> tuple[int, str] | None:
        return self.results.pop(step.name, None)

    def wait(self, seconds: float) -> None:
        pass  # nothing runs between two passes: `start` ran the step to its end

    def ended(self, o: Outcome) -> None:
        if self.pool is not None:
            self.pool.after(o.step)
        if o.state == "blocked":
            after = o.note.removeprefix("after failed ").split(", ")
            self.store.write_status(self.recipe.run, o.step, state="blocked", after=after)
            self.log.info("blocked", step=o.step, after=after)
        elif o.state == "cached":
            self.log.info("cached", step=o.step, fingerprint=(o.fingerprint or "")[:12], rows=o.rows)
        elif o.state == "failed" and not o.seconds:  # refused before it started (its inputs, its config)
            self.log.info("failed", step=o.step, exit_code=o.exit_code, error=o.note)
        elif o.state == "failed":
            self.log.info(
                "step failed",
                step=o.step,
                exit_code=o.exit_code,
                seconds=round(o.seconds, 1),
                error=o.note or None,
            )
        elif o.state == "done":
            self.log.info("step done", step=o.step, seconds=round(o.seconds, 1), rows=o.rows)
        if self.view:
            note = o.note
            if o.state == "failed":
                note = (
                    f"exit {o.exit_code}; log: "
                    f"{self.store.uri(self.store.path(self.recipe.run, '_logs', o.step + '.jsonl'))}"
                    if o.seconds
                    else f"exit {o.exit_code}"
                )
            self.view.end(o.step, o.state, o.seconds or None, o.rows, note)


def _run_step(
    recipe: Recipe,
    step: Step,
    store: Store,
    forced: bool,
    view: display.Display | None = None,
    warm: WarmPool | None = None,
) -> tuple[int, str | None]:
    """Exit code and the step's own error message; a sharded step runs its shards (hala.ops.drive gathers
    them)."""
    if step.shards > 1:
        for i in range(step.shards):
            label = f"{i + 1}/{step.shards}"
            if view:
                view.note(f"shard {label}")
            code, error = _spawn(
                step_command(recipe, step, (i, step.shards), forced),
                f"{step.name}[{i}/{step.shards}]",
                store,
                recipe.run,
                store.shard_name(step.name, i, step.shards),
                view,
                label,
                warm,
            )
            if code:
                return code, f"shard {i}/{step.shards}: {error}" if error else f"shard {i}/{step.shards}"
        if view:
            view.note("gather")
        return EXIT_OK, None
    return _spawn(
        step_command(recipe, step, None, forced), step.name, store, recipe.run, step.name, view, warm=warm
    )
