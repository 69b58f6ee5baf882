"""Warm interpreters (hala.kit.warm): a forked child is what `python -m MODULE ARGS` would be, or it is
refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hala.kit import warm
from helpers import REPO, hala, manifest, write_recipe

PROBE = """
import json, os, sys
STATE = globals().setdefault("STATE", [])
import hala.kit.warm as w
w._probe_calls = getattr(w, "_probe_calls", 0) + 1  # module state: must not leak from one child to the next
text = sys.stdin.read()
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "path0": sys.path[0], "stdin": text,
                  "env": os.environ.get("PROBE_VALUE"), "calls": w._probe_calls, "name": __name__}))
print("to stderr", file=sys.stderr)
code = os.environ.get("HALA_PROBE_EXIT")
if code == "raise":
    raise RuntimeError("probe failed on purpose")
if code == "message":
    sys.exit("a message instead of a code")
if code == "pipe":  # a write to a connection the other end reset
    r, w = os.pipe(); os.close(r); os.write(w, b"x")
if code == "sleep":
    import time; time.sleep(60)
sys.exit(int(code or 0))
"""


@pytest.fixture
def server(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg"), "PROBE_VALUE": "server"}
    srv = warm.Server(sys.executable, ["json", "sqlite3", "no_such_module_at_all"], env)
    assert srv.ready(60), srv.error
    yield srv, env, tmp_path
    srv.close()


def _run(srv, env, cwd, stdin="", **extra):
    proc = srv.popen(
        [sys.executable, "-m", "probe", "a", "--b"],
        env={**env, **extra},
        cwd=str(cwd),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(stdin)
    return proc.returncode, out, err


def test_a_forked_child_is_what_python_dash_m_would_be(server):
    srv, env, tmp = server
    code, out, err = _run(srv, env, tmp, stdin="hello")
    assert code == 0 and err == "to stderr\n"
    seen = json.loads(out)
    assert seen["argv"] == ["a", "--b"] and seen["stdin"] == "hello" and seen["name"] == "__main__"
    # as `python -m` puts the working directory first
    assert seen["cwd"] == str(tmp) and seen["path0"] == str(tmp)
    assert seen["env"] == "server"
    # the same module run as a plain process says the same (but the warm socket, which only a forked child
    # has)
    plain = subprocess.run(
        [sys.executable, "-m", "probe", "a", "--b"],
        input="hello",
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
    )
    assert json.loads(plain.stdout) == seen
    # every child is a fresh fork of the server: what one child changed, the next does not see
    assert json.loads(_run(srv, env, tmp)[1])["calls"] == 1


def test_exit_codes_and_errors_are_those_of_a_plain_interpreter(server):
    srv, env, tmp = server
    assert _run(srv, env, tmp, HALA_PROBE_EXIT="7")[0] == 7
    code, _, err = _run(srv, env, tmp, HALA_PROBE_EXIT="raise")
    assert code == 1 and "RuntimeError: probe failed on purpose" in err and "Traceback" in err
    code, _, err = _run(srv, env, tmp, HALA_PROBE_EXIT="message")
    assert code == 1 and "a message instead of a code" in err
    proc = srv.popen(
        [sys.executable, "-m", "probe"],
        env={**env, "HALA_PROBE_EXIT": "sleep"},
        cwd=str(tmp),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    assert proc.poll() is None
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_a_write_to_a_reset_connection_raises_as_in_a_plain_interpreter(server):
    """Python ignores SIGPIPE at start, so a write to a reset socket raises (the store's client retries it, or
    the step ends with 75); a forked child had it back at its default and died of signal 13 (issue 32, finding
    11)."""
    srv, env, tmp = server
    code, _, err = _run(srv, env, tmp, HALA_PROBE_EXIT="pipe")
    assert code == 1 and "BrokenPipeError" in err
    plain = subprocess.run(
        [sys.executable, "-m", "probe"],
        capture_output=True,
        text=True,
        cwd=tmp,
        env={**env, "HALA_PROBE_EXIT": "pipe"},
    )
    assert plain.returncode == code and "BrokenPipeError" in plain.stderr


def test_a_child_whose_import_time_environment_differs_is_refused(server):
    srv, env, tmp = server
    # HALA_* variables are read at run time: the child may differ there
    code, out, _ = _run(srv, env, tmp, HALA_SOMETHING="x")
    assert code == 0
    with pytest.raises(warm.Refused, match="PROBE_VALUE"):
        _run(srv, env, tmp, PROBE_VALUE="changed")  # the server imported its modules under the other value


def test_popen_falls_back_to_a_plain_process_outside_a_warm_step(tmp_path):
    os.environ.pop(warm.SOCKET_ENV, None)
    proc = warm.popen([sys.executable, "-c", "print('plain')"], stdout=subprocess.PIPE, text=True)
    assert isinstance(proc, subprocess.Popen) and proc.communicate()[0] == "plain\n"


def test_runner_steps_run_warm_and_commit_what_plain_processes_commit(tmp_path):
    steps = {
        "prepare-lamini": {
            "stage": "prepare",
            "inputs": {"source": str(REPO / "recipes" / "samples" / "lamini.jsonl")},
            "config": {"format": "columns", "columns": {"user": "instruction", "assistant": "response"}},
        }
    }
    outputs = {}
    for mode in ("1", "0"):
        path = write_recipe(tmp_path / f"warm-{mode}", steps)
        result = hala("run", str(path), env={"HALA_WARM": mode})
        assert result.returncode == 0, result.stderr + result.stdout[-2000:]
        m = manifest(tmp_path / f"warm-{mode}" / "store", "r", "prepare-lamini")
        assert m["host"]["warm"] is (mode == "1")
        # the same files under each run's own attempt folder
        outputs[mode] = [(f["path"].split("/", 1)[1], f["sha256"]) for f in m["outputs"]["data"]["files"]]
    assert outputs["1"] == outputs["0"]
