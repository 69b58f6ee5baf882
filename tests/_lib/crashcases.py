"""Crash at every store operation, and heal: the sequences of tests/contract/test_recovery.py and
bench/crashpoints.py.

A kind is a sequence of processes exactly as a runner starts them; each runs on a store (local, s3, gcs):

    step       `python -m stages.prepare` of a 4-row sample, two output files (a plain step)
    sharded    `python -m echo_stage --shard i/3` for i = 0..2, chunked through hala.kit.chunks, then
               `hala gather`
    artifact   `python -m hala.contract.tiny lfm2-350m --store URL`: artifact.ensure of a content-addressed
               stand-in (from the machine's cache: what is tried is its commit into the store, not its
               training)

A trial crashes the sequence at its Nth mutating operation (tests/_lib/crashpoints.py: SIGKILL, or an I/O
error before or after the operation), stops it there as a runner would, then runs the whole sequence again
without a crash. It healed when every process of the rerun exits 0, `hala verify` passes, and the committed
rows and file hashes equal those of an uninterrupted run; the crash itself must not be reported as bad data
(exit 3) or as a bug (exit 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crashpoints

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "contract" / "fixture_stages"
KINDS = ("step", "sharded", "artifact")
RUNS = {"step": "r", "sharded": "r", "artifact": "_sources"}
# verified by name: no _RUN.json lists them
STEPS = {"step": ["prepare-x"], "sharded": ["echo-rows"], "artifact": []}
# what a crashed process may end with: done (the crash hit a best-effort cleanup), temporary, killed
ALLOWED = {0, 75, -9}


def _py(env_name: str) -> str:
    return str(REPO / ".venvs" / env_name / "bin" / "python")


def recipe(kind: str, folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "step":
        body = {
            "prepare-x": {
                "stage": "prepare",
                "inputs": {"source": str(REPO / "recipes" / "samples" / "lamini.jsonl")},
                "config": {
                    "format": "columns",
                    "columns": {"user": "instruction", "assistant": "response"},
                    "rows_per_file": 2,
                },
            }
        }
    elif kind == "sharded":
        data = folder / "rows.jsonl"
        data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(12)))
        body = {
            "echo-rows": {
                "stage": "echo",
                "shards": 3,
                "inputs": {"data": str(data)},
                "config": {"chunk_rows": 2, "quarantine_every": 3},
            }
        }
    else:
        return REPO / "recipes" / "tiny.yaml"
    path = folder / f"{kind}.yaml"
    path.write_text(json.dumps({"name": "crash", "store": url, "run": "r", "steps": body}))
    return path


def commands(kind: str, recipe_path: Path, url: str) -> list[list[str]]:
    if kind == "step":
        return [[_py("data"), "-m", "stages.prepare", "--recipe", str(recipe_path), "--step", "prepare-x"]]
    if kind == "sharded":
        shards = [
            [
                _py("cli"),
                "-m",
                "echo_stage",
                "--recipe",
                str(recipe_path),
                "--step",
                "echo-rows",
                "--shard",
                f"{i}/3",
            ]
            for i in range(3)
        ]
        return [*shards, [_py("cli"), "-m", "hala.ops.cli", "gather", str(recipe_path), "echo-rows"]]
    return [
        [_py("models"), "-m", "hala.contract.tiny", "lfm2-350m", "--recipe", str(recipe_path), "--store", url]
    ]


def base_env(store_env: dict[str, str], tiny_cache: Path) -> dict[str, str]:
    """What every process of a sequence gets: the store's variables, a short lease TTL (a killed holder's
    lease on an object store is taken over after it), the echo stage, the machine cache of tiny stand-ins."""
    path = os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        **store_env,
        "HALA_LEASE_TTL": "2",
        "HALA_LOG_FORMAT": "json",
        "HALA_STAGES_PATH": str(FIXTURES),
        "PYTHONPATH": path,
        "HALA_TINY_CACHE": str(tiny_cache),
    }


def run_sequence(cmds: list[list[str]], env: dict[str, str], stop: bool = True) -> list[tuple[int, str]]:
    """Each command in turn; with `stop`, none after the first that fails (a runner's dependency rule)."""
    out = []
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out.append((proc.returncode, (proc.stdout + proc.stderr)[-3000:]))
        if stop and proc.returncode != 0:
            break
    return out


def snapshot(url: str, run: str, env: dict[str, str]) -> dict[str, Any]:
    """The committed result of a run, named without attempt ids (which differ between runs by design): per
    step its counts and, per output, its rows and the sorted sha256 of its files."""
    code = (
        "import json, sys\n"
        "from hala.contract.store import Store\n"
        "store, run = Store(sys.argv[1]), sys.argv[2]\n"
        "out = {}\n"
        "for p in sorted(store.fs.ls(store.path(run), detail=False, refresh=True)):\n"
        "    name = p.rstrip('/').rsplit('/', 1)[-1]\n"
        "    m = store.read_manifest(run, name)\n"
        "    if m is None: continue\n"
        "    out[name] = {'counts': m.get('counts'), 'outputs': {k: {'rows': o.get('rows'), 'sha256': "
        "sorted(f['sha256'] for f in o['files'])}\n"
        "                 for k, o in m['outputs'].items()}}\n"
        "print(json.dumps(out, sort_keys=True))\n"
    )
    proc = subprocess.run(
        [_py("cli"), "-c", code, url, run], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout)


def verify(url: str, kind: str, env: dict[str, str]) -> tuple[int, str]:
    """`hala verify` of the kind's step by name (exit 2 when it is not committed); an artifact's run
    `_sources` has its artifacts verified."""
    cmd = [
        _py("cli"),
        "-X",
        "faulthandler",
        "-m",
        "hala.ops.cli",
        "verify",
        RUNS[kind],
        *STEPS[kind],
        "--store",
        url,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**env, "PYTHONFAULTHANDLER": "1"}, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, (proc.stdout + proc.stderr)[-2000:]


STORES = ("local", "s3", "gcs")
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "hala-test",
    "AWS_SECRET_ACCESS_KEY": "hala-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "FSSPEC_S3": json.dumps(
        {
            "config_kwargs": {
                "retries": {"mode": "standard", "total_max_attempts": 2},
                "connect_timeout": 2,
                "read_timeout": 10,
            }
        }
    ),
}


@dataclass
class Where:
    """A store of a kind: the URL of a fresh one per folder, the environment its clients need, and the crash
    plan's root (a local store's folder; object stores count every request that changes the bucket)."""

    name: str
    env: dict[str, str]
    url_for: Callable[[Path], str]

    def root(self, folder: Path) -> str:
        return self.url_for(folder) if self.name == "local" else f"{self.name}://"


@contextlib.contextmanager
def store(name: str, s3_endpoint: str | None = None) -> Iterator[Where]:
    """A running store of kind `name` on 127.0.0.1: local needs nothing; s3 is moto's server
    (tests/_lib/s3server.py, or the endpoint given), gcs is fake-gcs-server (tests/_lib/gcsserver.py). Each
    folder gets its own prefix."""
    tag = uuid.uuid4().hex[:8]
    if name == "local":
        yield Where(name, {}, lambda folder: str(folder / "store"))
    elif name == "s3":
        import logging

        import s3server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = thread = None
        if s3_endpoint is None:
            server, _ = s3server.make(0)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            s3_endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
        try:
            import s3fs

            fs = s3fs.S3FileSystem(
                endpoint_url=s3_endpoint,
                key=env["AWS_ACCESS_KEY_ID"],
                secret=env["AWS_SECRET_ACCESS_KEY"],
                skip_instance_cache=True,
            )
            if not fs.exists("hala-crash"):
                fs.mkdir("hala-crash")
            yield Where(name, env, lambda folder: f"s3://hala-crash/{tag}-{folder.name}")
        finally:
            if server is not None:
                server.shutdown()
                thread.join(timeout=10)
    elif name == "gcs":
        import gcsserver

        with gcsserver.serve("hala-crash") as env:
            yield Where(name, env, lambda folder: f"gs://hala-crash/{tag}-{folder.name}")
    else:
        raise ValueError(f"unknown store {name!r}: one of {', '.join(STORES)}")


@dataclass
class Trial:
    at: int
    mode: str
    crashed: list[int] = field(default_factory=list)  # exit codes of the crashed sequence
    rerun: list[int] = field(default_factory=list)
    healed: bool = False
    why: str = ""


def reference(
    kind: str, folder: Path, url: str, store_env: dict[str, str], tiny_cache: Path, root: str
) -> tuple[int, dict[str, Any]]:
    """The uninterrupted run: how many operations the sequence makes, and what it commits."""
    path = recipe(kind, folder, url)
    counter = folder / "reference.count"
    env = crashpoints.env(
        root, counter, at=0, log=folder / "reference.ops", base=base_env(store_env, tiny_cache)
    )
    results = run_sequence(commands(kind, path, url), env)
    if any(code != 0 for code, _ in results):
        raise RuntimeError(f"the uninterrupted {kind} run failed: {results[-1][1]}")
    return crashpoints.count(counter), snapshot(url, RUNS[kind], base_env(store_env, tiny_cache))


def trial(
    kind: str,
    folder: Path,
    url: str,
    store_env: dict[str, str],
    tiny_cache: Path,
    root: str,
    at: int,
    mode: str,
    expected: dict[str, Any],
) -> Trial:
    """Crash at operation `at` of a fresh store, rerun, and check the result against `expected`."""
    t = Trial(at, mode)
    path = recipe(kind, folder, url)
    plain = base_env(store_env, tiny_cache)
    env = crashpoints.env(
        root, folder / f"{at}.{mode}.count", at=at, mode=mode, log=folder / f"{at}.{mode}.ops", base=plain
    )
    crashed = run_sequence(commands(kind, path, url), env)
    t.crashed = [code for code, _ in crashed]
    bad = [(code, text) for code, text in crashed if code not in ALLOWED]
    if bad:
        t.why = f"the crash was reported as exit {bad[0][0]}: {bad[0][1][-800:]}"
        return t
    rerun = run_sequence(commands(kind, path, url), plain, stop=False)
    t.rerun = [code for code, _ in rerun]
    failed = [(code, text) for code, text in rerun if code != 0]
    if failed:
        t.why = f"the rerun ended with exit {failed[0][0]}: {failed[0][1][-800:]}"
        return t
    code, text = verify(url, kind, plain)
    if code != 0:
        t.why = f"hala verify exit {code}: {text}"
        return t
    got = snapshot(url, RUNS[kind], plain)
    if got != expected:
        t.why = f"the rerun committed something else: {json.dumps(got)[:800]} != {json.dumps(expected)[:800]}"
        return t
    t.healed = True
    return t


def stopped(pid: int) -> bool:
    """The process froze itself at a `stop` crash point (state T)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def pair(
    where: Where, folder: Path, tiny_cache: Path, total: int, rng: Any, pause_s: float = 3.0
) -> dict[str, Any]:
    """Two writers of one step (kind `step`) started `rng`-apart; the first freezes (SIGSTOP) at a random one
    of its `total` operations, stays frozen `pause_s` (past the lease's TTL of 2 s: on an object store the
    second writer takes the lease over), then goes on. What the store must end with: one commit, its files all
    there with their hashes."""
    import time

    url = where.url_for(folder)
    path = recipe("step", folder, url)
    cmd = commands("step", path, url)[0]
    env = base_env(where.env, tiny_cache)
    at, offset = rng.randint(1, total), rng.uniform(0.0, 1.5)
    first_env = crashpoints.env(where.root(folder), folder / "count", at=at, mode="stop", base=env)
    first = subprocess.Popen(
        cmd, cwd=REPO, env=first_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(offset)
    second = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    paused = False
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if stopped(first.pid):
            paused = True
            time.sleep(pause_s)
            crashpoints.resume(first, folder / "count")
            break
        time.sleep(0.02)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    codes = [first.returncode, second.returncode]
    committed = sum(1 for out, _ in outs for line in out.splitlines() if '"event": "committed"' in line)
    vcode, vtext = verify(url, "step", env)
    return {
        "at": at,
        "offset_s": round(offset, 2),
        "paused": paused,
        "codes": codes,
        "commits": committed,
        "verified": vcode == 0,
        "ok": committed == 1 and vcode == 0 and all(c in (0, 75) for c in codes),
        "why": "" if vcode == 0 else vtext[-1000:],
        "tails": [(out + err)[-1500:] for out, err in outs] if committed != 1 or vcode != 0 else [],
    }


def sample(total: int, n: int) -> list[int]:
    """`n` points spread over 1..total, the first and the last included (the lease and the commit)."""
    if n >= total:
        return list(range(1, total + 1))
    step = (total - 1) / (n - 1)
    return sorted({1 + round(i * step) for i in range(n)})


if __name__ == "__main__":  # pragma: no cover - a helper module, driven by bench/crashpoints.py and the tests
    sys.exit("run bench/crashpoints.py or tests/contract/test_recovery.py")
