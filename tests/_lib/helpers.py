"""Helpers for the test suites (standard library, pytest and the common library's dependencies only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def write_recipe(
    folder: Path,
    steps: dict[str, Any],
    name: str = "test",
    store: str | None = None,
    run: str = "r",
    **top: Any,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = {"name": name, "store": store or str(folder / "store"), "run": run, **top, "steps": steps}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def hala(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The `hala` command, as a user runs it (a subprocess of this environment's Python)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hala.ops.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (the only address a test server listens on)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(stdout: str) -> list[dict[str, Any]]:
    """The JSON log events of a command's stdout (non-JSON lines are skipped)."""
    out = []
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def manifest(store: Path, run: str, step: str) -> dict[str, Any]:
    return json.loads((store / run / step / "_MANIFEST.json").read_text())


def output_dir(store: Path, run: str, step: str, output: str = "data") -> Path:
    """Where a committed step's output lies: its manifest names the attempt folder
    (`attempt-<id>/<output>`)."""
    return store / run / step / manifest(store, run, step)["outputs"][output]["path"]
