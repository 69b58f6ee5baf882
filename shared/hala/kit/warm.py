"""Warm interpreters: a step's process forked from one that already imported torch and transformers.

On two CPU cores, `import torch, transformers` and the auto classes take ~10 s (LightEval ~21 s), while a
tiny stand-in's whole step needs one or two: in the tiny recipe, imports were most of `make run`. The local
runner therefore starts, per environment that a run uses, one server (`python -m hala.kit.warm`) in that
environment. It imports the modules the environment's stages declare (`[env] warm` in stage.toml) and
nothing else: no model, no thread pool, no torch operation. For each step it forks a child that becomes
exactly what `python -m stages.<stage> ARGS` would be (argv, environment, working directory, stdin/stdout/
stderr on the caller's pipes), runs the stage's `__main__` and exits with its code. The stage code and its
inputs are the same as in a container; only the imports were done once.

Why forking is safe here: the server has run no parallel torch operation (GNU OpenMP's pool does not survive a
fork, which is why a fork from a stage process that did work is not), has started no thread, and holds no
file but its own sockets, which the child closes. Each child is a fresh fork of the pristine server, so no
state passes from one step to the next.

A step's own helper processes (the merge check, LightEval's isolated runs) use `popen()`: from the same
server when the step itself runs warm (HALA_WARM_SOCKET is set), a plain subprocess otherwise.

Protocol (a Unix socket; one JSON object per message, 4-byte length first; file descriptors by SCM_RIGHTS):
    request  {"module", "args", "env", "cwd"} with fds [stdin, stdout, stderr]  ->  {"pid"} or {"error"}
    later    {"pid", "exit"}   (exit: the code, or -signal like subprocess)
"""

from __future__ import annotations

import array
import atexit
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

SOCKET_ENV = "HALA_WARM_SOCKET"
# A child may differ from its server only in variables read at run time: ours (HALA_*), and PYTHONPATH, which
# the child applies to sys.path. Anything else (HF_HUB_OFFLINE, OMP_NUM_THREADS, ...) may have been read when
# the server imported its modules, so a request whose environment differs there runs as a plain process.
RUNTIME_ENV_PREFIXES = ("HALA_", "PYTHONPATH")


def env_difference(wanted: dict[str, str], server: dict[str, str]) -> list[str]:
    """Variables that would make a forked child differ from `python -m` started with `wanted`."""
    keys = set(wanted) | set(server)
    return sorted(
        k for k in keys if not k.startswith(RUNTIME_ENV_PREFIXES) and wanted.get(k) != server.get(k)
    )


# --- the server
# ----------------------------------------------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(payload)


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) when the peer closed."""
    fds = array.array("i")
    head, ancdata, _, _ = sock.recvmsg(4, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if len(head) < 4:
        return None, list(fds)
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None, list(fds)
        body += chunk
    return json.loads(body), list(fds)


def _child(request: dict[str, Any], fds: list[int], keep_closed: list[socket.socket]) -> None:
    """In the forked child: become `python -m MODULE ARGS` and exit with its code. Never returns."""
    code = 1
    try:
        for s in keep_closed:
            s.close()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # what the interpreter sets up at start: a write to a reset connection raises (BrokenPipeError, a
        # retry of the store's client, at worst exit 75) instead of killing the step with signal 13
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[SOCKET_ENV] = request.get("socket", "")
        os.chdir(request["cwd"])
        # as `python -m` would set it up: the working directory first, then PYTHONPATH, then the rest
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[0:1] = [os.getcwd(), *extra]
        sys.argv = [request["module"], *request["args"]]
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:  # noqa: BLE001 - what the interpreter would print, then its exit code
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what a normal interpreter runs at exit (logging flush, library cleanups)
    except BaseException:  # noqa: BLE001 - a child must never return into the server's loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF if code >= 0 else 1)


def serve(path: str, preload: list[str]) -> None:
    """Import `preload`, then fork a child per request until the listening socket's owner goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the steps; the runner ends the server
    own_env = dict(os.environ)
    for name in preload:
        module, _, attr = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if attr:
                getattr(loaded, attr)  # transformers' auto classes load their modules on first access
        except Exception as e:  # noqa: BLE001 - the child imports it itself, and meets the same error there
            print(
                f"hala.kit.warm: {name} not preloaded: {type(e).__name__}: {e}", file=sys.stderr, flush=True
            )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    sys.stdout.write(json.dumps({"ready": path, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)  # the runner holds our stdin: EOF means it is gone
    clients: list[socket.socket] = []
    owner: dict[int, socket.socket] = {}
    while True:
        for key, _ in sel.select(timeout=0.05):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                clients.append(conn)
                sel.register(conn, selectors.EVENT_READ)
            elif key.fileobj is sys.stdin:
                if not sys.stdin.buffer.read1(4096):
                    return
            else:
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    request, fds = _recv(conn)
                except OSError:
                    request, fds = None, []
                if request is None:
                    sel.unregister(conn)
                    clients.remove(conn)
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                request["socket"] = path
                differ = env_difference(request["env"], own_env)
                if differ:
                    for fd in fds:
                        os.close(fd)
                    _send(
                        conn,
                        {
                            "error": "environment differs from the warm interpreter's in "
                            f"{', '.join(differ[:5])}"
                        },
                    )
                    continue
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, [listener, *clients])
                for fd in fds:
                    os.close(fd)
                owner[pid] = conn
                _send(conn, {"pid": pid})
        while owner:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = owner.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if conn is not None and conn in clients:
                try:
                    _send(conn, {"pid": pid, "exit": code})
                except OSError:
                    pass


# --- the client
# ----------------------------------------------------------------------------------------------


class Refused(OSError):
    """The server will not fork this request (its environment differs): run it as a plain process."""


class _Connection:
    """One connection to a server: requests one at a time, exits routed to whoever waits for that pid."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.lock = threading.Lock()
        self.cond = threading.Condition()
        self.exits: dict[int, int] = {}
        self.replies: list[dict[str, Any]] = []
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                message, _ = _recv(self.sock)
            except OSError:
                message = None
            with self.cond:
                if message is None:
                    self.closed = True
                elif "exit" in message:
                    self.exits[message["pid"]] = message["exit"]
                else:
                    self.replies.append(message)
                self.cond.notify_all()
            if message is None:
                return

    def start(self, module: str, args: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> int:
        with self.lock:
            _send(self.sock, {"module": module, "args": args, "env": env, "cwd": cwd}, fds)
            with self.cond:
                while not self.replies and not self.closed:
                    self.cond.wait()
                if not self.replies:
                    raise OSError("the warm interpreter went away")
                reply = self.replies.pop(0)
        if "pid" not in reply:
            raise Refused(reply.get("error", "the warm interpreter refused the request"))
        return int(reply["pid"])

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while pid not in self.exits:
                if self.closed:
                    return -signal.SIGKILL  # the server died with it
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.cond.wait(left)
            return self.exits[pid]


class WarmProcess:
    """What the callers of subprocess.Popen use of it: pid, stdin/stdout/stderr, poll, wait, kill,
    communicate."""

    def __init__(
        self,
        conn: _Connection,
        module: str,
        args: list[str],
        env: dict[str, str],
        cwd: str,
        stdin: Any = None,
        stdout: Any = None,
        stderr: Any = None,
        text: bool = False,
        encoding: str | None = None,
    ):
        self.conn = conn
        self.returncode: int | None = None
        self.stdin: IO[Any] | None = None
        self.stdout: IO[Any] | None = None
        self.stderr: IO[Any] | None = None
        mine: list[int] = []  # ends this process keeps, wrapped as files
        theirs: list[int] = []  # ends the child gets (closed here once sent)
        null = os.open(os.devnull, os.O_RDWR)
        mode_kw = {"encoding": encoding or ("utf-8" if text else None)} if (text or encoding) else {}

        def wire(spec: Any, child_reads: bool, inherit: int) -> int:
            """The child's end goes to `theirs`; returns the end this process keeps, or -1."""
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                ours, child = (w, r) if child_reads else (r, w)
                mine.append(ours)
                theirs.append(child)
                return ours
            if spec is None:
                theirs.append(os.dup(inherit))
            elif isinstance(spec, int):
                theirs.append(os.dup(spec))
            else:
                theirs.append(os.dup(spec.fileno()))
            return -1

        try:
            ours_in = wire(stdin if stdin is not None else null, True, 0)
            ours_out = wire(stdout, False, 1)
            if stderr == subprocess.STDOUT:
                theirs.append(os.dup(theirs[-1]))
                ours_err = -1
            else:
                ours_err = wire(stderr, False, 2)
            self.pid = conn.start(module, args, env, cwd, theirs)
        except BaseException:
            for fd in mine:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
            os.close(null)
        if ours_in >= 0:
            self.stdin = os.fdopen(ours_in, "w" if mode_kw else "wb", **mode_kw)
        if ours_out >= 0:
            self.stdout = os.fdopen(ours_out, "r" if mode_kw else "rb", **mode_kw)
        if ours_err >= 0:
            self.stderr = os.fdopen(ours_err, "r" if mode_kw else "rb", **mode_kw)
        self.args = [sys.executable, "-m", module, *args]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.conn.wait(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.conn.wait(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        out_box: list[Any] = []
        err_box: list[Any] = []
        readers = []
        for stream, box in ((self.stdout, out_box), (self.stderr, err_box)):
            if stream is not None:
                t = threading.Thread(target=lambda s=stream, b=box: b.append(s.read()), daemon=True)
                t.start()
                readers.append(t)
        for t in readers:
            t.join()
        self.wait(timeout)
        return (out_box[0] if out_box else None), (err_box[0] if err_box else None)

    def __enter__(self) -> WarmProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self.wait()


class Server:
    """A warm interpreter of one environment, started by the runner, ended with `close()`."""

    def __init__(self, python: str, preload: list[str], env: dict[str, str]):
        self.dir = tempfile.mkdtemp(prefix="hala-warm-")
        self.path = os.path.join(self.dir, "s")
        self.proc = subprocess.Popen(
            [python, "-m", "hala.kit.warm", self.path, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.conn: _Connection | None = None
        self.error: str | None = None
        self._ready = threading.Thread(target=self._wait_ready, daemon=True)
        self._ready.start()  # the imports go on while the runner does other work

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            json.loads(line)["ready"]
            self.conn = _Connection(self.path)
        except (ValueError, KeyError, TypeError, OSError) as e:
            self.error = f"warm interpreter did not start ({type(e).__name__}: {e}; exit {self.proc.poll()})"

    def ready(self, timeout: float = 600) -> bool:
        self._ready.join(timeout)
        return self.conn is not None

    def popen(self, cmd: list[str], env: dict[str, str], cwd: str | None = None, **kw: Any) -> WarmProcess:
        if cmd[1:2] != ["-m"]:
            raise ValueError(f"a warm interpreter runs `python -m MODULE ...`, not {cmd}")
        assert self.conn is not None
        return WarmProcess(self.conn, cmd[2], cmd[3:], env, cwd or os.getcwd(), **kw)

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()  # EOF: the server returns
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self.conn is not None:
            self.conn.sock.close()
        try:
            Path(self.path).unlink(missing_ok=True)
            os.rmdir(self.dir)
        except OSError:
            pass


_local: _Connection | None = None


def popen(cmd: list[str], **kw: Any) -> Any:
    """subprocess.Popen(cmd, **kw), or the same child forked from this step's warm server when the step itself
    runs warm and cmd is `sys.executable -m MODULE ...` (the merge check, LightEval's isolated runs)."""
    global _local
    path = os.environ.get(SOCKET_ENV)
    if path and cmd[:2] == [sys.executable, "-m"] and os.path.exists(path):
        try:
            if _local is None or _local.closed:
                _local = _Connection(path)
            env = dict(kw.pop("env", None) or os.environ)
            return WarmProcess(_local, cmd[2], cmd[3:], env, kw.pop("cwd", None) or os.getcwd(), **kw)
        except OSError:
            pass  # the server is gone: a plain process does the same work
    return subprocess.Popen(cmd, **kw)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2:])
