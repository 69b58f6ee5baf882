"""Crash points: fail a process at the Nth mutating store operation, for the recovery tests and
bench/crashpoints.py.

A plan travels in the environment (`HALA_CRASH_PLAN`, JSON) and is installed at interpreter start by
tests/_lib/crashhook/sitecustomize.py (on PYTHONPATH: `env(...)` puts it there), so that it reaches every
process a test starts (a step command, its shards, `hala gather`) and every store operation they make,
whatever library makes it. The processes of one sequence share a counter file (under flock), so N counts
across them:

    root        local stores: only operations on paths under it count (the store's folder)
    at          the operation that fails, 1-based; 0 counts and never fails (the counting run)
    mode        kill         SIGKILL before the operation (a pod evicted, a node lost)
                raise        OSError(EIO) instead of the operation (a store that refused it)
                raise-after  the operation done, then OSError(EIO) (its answer lost: the caller cannot know
                             it happened)
                stop         SIGSTOP before the operation: the process freezes there until the test calls
                             `resume(proc, counter)` (a paused pod, a long GC pause, a partition), then does
                             the operation. A SIGCONT from anywhere else before `resume` stops it again and
                             says so on stderr: the test, not the machine, decides when it goes on.
    match       a regex: only operations whose description matches count (e.g. a `_PART.json` write)
    counter     the shared counter file; `log` (optional) gets one line per counted operation

What counts as a mutating operation: on a local store os.link/rename/replace/unlink/remove/rmdir/mkdir, an
os.open or open() that creates or writes, shutil.rmtree and os.fsync of a file under root (the fsync *is* the
durability point); on S3 every s3fs request that changes the bucket (PUT, COPY, DELETE, multipart parts); on
GCS every gcsfs request with POST, PUT, PATCH or DELETE. Native writers (pyarrow's own filesystem) are not
seen: the protocol's points are the Python-level ones above.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import importlib.abc
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "HALA_CRASH_PLAN"
HOOK = Path(__file__).resolve().parent / "crashhook"
LIB = Path(__file__).resolve().parent
S3_MUTATING = {
    "put_object",
    "copy_object",
    "delete_object",
    "delete_objects",
    "create_multipart_upload",
    "upload_part",
    "upload_part_copy",
    "complete_multipart_upload",
    "abort_multipart_upload",
}


def env(
    root: str | os.PathLike,
    counter: str | os.PathLike,
    at: int = 0,
    mode: str = "kill",
    match: str | None = None,
    log: str | os.PathLike | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a process that runs under the plan (`base`: the environment to extend, default
    os.environ)."""
    assert mode in ("kill", "raise", "raise-after", "stop"), mode
    base = dict(os.environ if base is None else base)
    plan = {
        "root": str(root),
        "at": at,
        "mode": mode,
        "match": match,
        "counter": str(counter),
        "log": str(log) if log else None,
        "release": release_file(counter),
    }
    path = os.pathsep.join(filter(None, [str(HOOK), str(LIB), base.get("PYTHONPATH")]))
    return {**base, ENV: json.dumps(plan), "PYTHONPATH": path}


def release_file(counter: str | os.PathLike) -> str:
    """The file whose presence lets a process frozen in mode `stop` go on (beside the counter)."""
    return f"{os.fspath(counter)}.release"


def resume(proc: Any, counter: str | os.PathLike) -> None:
    """Let the process frozen at its stop point go on: the release file first, then SIGCONT."""
    Path(release_file(counter)).touch()
    proc.send_signal(signal.SIGCONT)


def count(counter: str | os.PathLike) -> int:
    """Operations counted so far in a sequence."""
    try:
        return int(Path(counter).read_text() or 0)
    except FileNotFoundError:
        return 0


class _Plan:
    def __init__(self, plan: dict[str, Any]):
        self.root = os.path.realpath(plan["root"]) if "://" not in plan["root"] else plan["root"]
        self.at = int(plan["at"])
        self.mode = plan["mode"]
        self.match = re.compile(plan["match"]) if plan.get("match") else None
        self.counter = plan["counter"]
        self.log = plan.get("log")
        self.release = plan.get("release")
        self.busy = False  # the counter's own file operations are not counted

    def under(self, path: Any) -> bool:
        if isinstance(path, int) or path is None:
            return False
        try:
            text = os.fsdecode(path)
        except TypeError:
            return False
        return os.path.realpath(os.path.abspath(text)).startswith(self.root + os.sep)

    def tick(self, what: str) -> bool:
        """Count one operation; True when it is the one that fails."""
        if self.busy or (self.match and not self.match.search(what)):
            return False
        self.busy = True
        try:
            fd = _real_open(self.counter, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                n = int(os.read(fd, 32) or b"0") + 1
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, str(n).encode())
            finally:
                os.close(fd)
            if self.log:
                with _real_builtin_open(self.log, "a", encoding="utf-8") as f:
                    f.write(f"{n}\t{os.getpid()}\t{what}\n")
            return n == self.at
        finally:
            self.busy = False

    def freeze(self, what: str) -> None:
        """SIGSTOP this process until the test releases it (see `stop` above). The signal goes to this very
        thread (tgkill): sent to the process, another thread may take it and this one runs on until its next
        system call, long enough to send the request it was to stop before (a CI run's frozen writer wrote its
        manifest so)."""
        me = threading.get_ident()
        signal.pthread_kill(me, signal.SIGSTOP)
        while self.release and not os.path.exists(self.release):
            sys.stderr.write(
                f"crash point: continued before the test released it, stopping again at {what}\n"
            )
            sys.stderr.flush()
            signal.pthread_kill(me, signal.SIGSTOP)

    def fail(self, what: str) -> None:
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.EIO, f"crash point: {what}")

    def around(self, what: str, call: Callable[[], Any]) -> Any:
        if not self.tick(what):
            return call()
        if self.mode == "stop":
            self.freeze(what)
            return call()
        if self.mode == "raise-after":
            call()
        self.fail(what)


_real_open = os.open
_real_builtin_open = builtins.open
_PLAN: _Plan | None = None


def _wrap_path_op(name: str, nargs: int) -> None:
    real = getattr(os, name)

    def op(*args: Any, **kwargs: Any) -> Any:
        plan = _PLAN
        paths = args[:nargs]
        if (
            plan is None
            or plan.busy
            or not any(plan.under(p) for p in paths)
            or kwargs.get("dir_fd") is not None
        ):
            return real(*args, **kwargs)
        if name == "mkdir" and os.path.isdir(paths[0]):
            return real(*args, **kwargs)  # an existing folder (makedirs' exist_ok): nothing changes
        return plan.around(f"{name} {' '.join(os.fsdecode(p) for p in paths)}", lambda: real(*args, **kwargs))

    op.__name__ = name
    setattr(os, name, op)


_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
    plan = _PLAN
    if (
        plan is None
        or plan.busy
        or not flags & _WRITES
        or kwargs.get("dir_fd") is not None
        or not plan.under(path)
    ):
        return _real_open(path, flags, *args, **kwargs)
    return plan.around(f"open {os.fsdecode(path)}", lambda: _real_open(path, flags, *args, **kwargs))


def _builtin_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    plan = _PLAN
    if plan is None or plan.busy or not any(c in mode for c in "wax+") or not plan.under(file):
        return _real_builtin_open(file, mode, *args, **kwargs)
    return plan.around(f"open {os.fsdecode(file)}", lambda: _real_builtin_open(file, mode, *args, **kwargs))


_real_fsync = os.fsync


def _fsync(fd: Any) -> None:
    plan = _PLAN
    if plan is None or plan.busy:
        return _real_fsync(fd)
    try:
        path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
    except OSError:
        return _real_fsync(fd)
    if not plan.under(path):
        return _real_fsync(fd)
    return plan.around(f"fsync {path}", lambda: _real_fsync(fd))


_real_rmtree = shutil.rmtree


def _rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
    plan = _PLAN
    if plan is None or plan.busy or not plan.under(path):
        return _real_rmtree(path, *args, **kwargs)
    return plan.around(f"rmtree {os.fsdecode(path)}", lambda: _real_rmtree(path, *args, **kwargs))


def _patch_s3fs(module: Any) -> None:
    cls = module.S3FileSystem
    real = cls._call_s3

    async def _call_s3(self: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
        name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
        plan = _PLAN
        if plan is None or name not in S3_MUTATING:
            return await real(self, method, *args, **kwargs)
        what = f"s3.{name} {kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}"
        if not plan.tick(what):
            return await real(self, method, *args, **kwargs)
        if plan.mode == "stop":
            plan.freeze(what)
            return await real(self, method, *args, **kwargs)
        if plan.mode == "raise-after":
            await real(self, method, *args, **kwargs)
        plan.fail(what)

    cls._call_s3 = _call_s3
    from fsspec.asyn import sync_wrapper

    cls.call_s3 = sync_wrapper(_call_s3)  # s3fs binds its sync twin at class creation, to the unpatched one


def _patch_gcsfs(module: Any) -> None:
    cls = module.GCSFileSystem
    real = cls._request

    async def _request(self: Any, method: str, path: Any, *args: Any, **kwargs: Any) -> Any:
        plan = _PLAN
        if plan is None or method.upper() not in ("POST", "PUT", "PATCH", "DELETE"):
            return await real(self, method, path, *args, **kwargs)
        what = (
            f"gcs.{method.upper()} {path} {' '.join(str(a) for a in args if isinstance(a, str))} "
            f"{_gcs_object(kwargs)}"
        )
        if not plan.tick(what):
            return await real(self, method, path, *args, **kwargs)
        if plan.mode == "stop":
            plan.freeze(what)
            return await real(self, method, path, *args, **kwargs)
        if plan.mode == "raise-after":
            await real(self, method, path, *args, **kwargs)
        plan.fail(what)

    cls._request = _request


def _gcs_object(kwargs: dict[str, Any]) -> str:
    """The object an upload writes: uploads name it in their JSON metadata (the body's first part, or
    `json`)."""
    if kwargs.get("name"):
        return str(kwargs["name"])
    if isinstance(kwargs.get("json"), dict) and kwargs["json"].get("name"):
        return str(kwargs["json"]["name"])
    data = kwargs.get("data")
    if isinstance(data, io.BytesIO):
        data = data.getvalue()
    if isinstance(data, (bytes, bytearray)):
        found = re.search(rb'"name":\s*"([^"]+)"', bytes(data[:2000]))
        if found:
            return found.group(1).decode(errors="replace")
    return ""


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches s3fs and gcsfs when (if ever) the process imports them: a step imports them late, or never."""

    PATCHES = {"s3fs.core": _patch_s3fs, "gcsfs.core": _patch_gcsfs}

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, self.PATCHES[name]
        real_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Install the plan of HALA_CRASH_PLAN in this process (sitecustomize calls it; without the variable,
    nothing)."""
    global _PLAN
    raw = os.environ.get(ENV)
    if not raw or _PLAN is not None:
        return
    _PLAN = _Plan(json.loads(raw))
    for name, nargs in (
        ("link", 2),
        ("rename", 2),
        ("replace", 2),
        ("unlink", 1),
        ("remove", 1),
        ("rmdir", 1),
        ("mkdir", 1),
    ):
        _wrap_path_op(name, nargs)
    os.open = _os_open
    os.fsync = _fsync
    builtins.open = io.open = _builtin_open
    shutil.rmtree = _rmtree
    sys.meta_path.insert(0, _AfterImport())
