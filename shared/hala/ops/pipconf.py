"""This machine's package sources, read from pip's own configuration and handed to uv.

uv reads no pip configuration, yet the machines we run on name their sources there: a local
`find-links` folder that holds torch's CPU build, file:// mirrors of PyPI as extra indexes, a CA
bundle for an egress that re-signs TLS. `pip config list` is the authority on what pip would use
(its files in pip's order, then PIP_* variables); this module turns it into uv arguments, so that
nothing machine-specific is written into the project.

    python3 shared/hala/ops/pipconf.py                    # the uv arguments, one per line
    python3 shared/hala/ops/pipconf.py uv pip sync L.txt  # uv with them (and pip's CA bundle): the Makefile's
    from hala.ops import pipconf; pipconf.uv_args()

Standard library only: the Makefile runs it with the system Python before any environment exists.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# torch's CPU builds (a flat page of every torch wheel, `+cpu` ones included) for a machine whose pip
# configuration names no folder holding them; the files are the ones the locks' hashes were taken from.
TORCH_CPU_LINKS = "https://download.pytorch.org/whl/torch/"


def _pip_pythons(python: str | None) -> list[str]:
    # uv's environments have no pip: ask the interpreter they were made from, then python3 on PATH
    found = [python, sys.executable, getattr(sys, "_base_executable", None), shutil.which("python3")]
    return list(dict.fromkeys(p for p in found if p))


@functools.cache
def pip_config(python: str | None = None) -> dict[str, str]:
    """`pip config list` as {key: value}, PIP_* variables (`:env:`) over the files; {} without pip."""
    out = None
    for candidate in _pip_pythons(python):
        try:
            proc = subprocess.run(
                [candidate, "-m", "pip", "config", "list"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if proc.returncode == 0:
            out = proc
            break
    if out is None:
        return {}
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        scope, _, name = key.rpartition(".")
        try:
            value = shlex.split(value)[0] if value.strip() else ""
        except ValueError:
            continue
        if scope == ":env:":
            env[name] = value
        elif scope in ("global", "install", "download"):
            files.setdefault(name, value)
    return {**files, **env}


def uv_args(python: str | None = None) -> list[str]:
    """uv's index, find-links and TLS arguments equivalent to pip's configuration on this machine."""
    conf = pip_config(python)
    args: list[str] = []
    if conf.get("index-url"):
        args += ["--default-index", conf["index-url"]]
    extra = conf.get("extra-index-url", "").split()
    for url in extra:
        args += ["--index", url]
    for link in conf.get("find-links", "").split():
        args += ["--find-links", link]
    if extra:
        # pip takes the best version over all its indexes; uv's default stops at the first index that knows
        # a package, and a partial local mirror would then hide the pinned version PyPI has
        args += ["--index-strategy", "unsafe-best-match"]
    return args


def uv_env(python: str | None = None) -> dict[str, str]:
    """Environment for uv: pip's CA bundle (an egress that re-signs TLS) when SSL_CERT_FILE is not set."""
    cert = pip_config(python).get("cert")
    if cert and not os.environ.get("SSL_CERT_FILE") and Path(cert).is_file():
        return {"SSL_CERT_FILE": cert}
    return {}


def local_wheel(pattern: str, python: str | None = None) -> Path | None:
    """A wheel matching `pattern` in one of pip's find-links folders (e.g. torch-2.13.0+cpu-cp311-*)."""
    for link in pip_config(python).get("find-links", "").split():
        folder = Path(link.removeprefix("file://"))
        if folder.is_dir():
            found = sorted(folder.glob(pattern))
            if found:
                return found[0]
    return None


if __name__ == "__main__":
    if len(sys.argv) > 1:
        os.execvpe(sys.argv[1], [*sys.argv[1:], *uv_args()], {**os.environ, **uv_env()})
    print("\n".join(uv_args()))
