"""Two writers of one step at once, on a local store and on S3 (moto's server on 127.0.0.1, conftest.py).

Kubernetes can run two pods of one Job index at once and two people can run one step on one store. Whatever
the timing, the store must end with exactly one committed result whose every file matches its manifest, no
file of the other writer beside it, and both processes must end with 0 (the result is the committed one) or
75.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import crashpoints
from hala.contract.store import Store
from helpers import REPO, events, hala, write_recipe

PY = REPO / ".venvs" / "data" / "bin" / "python"
ROWS = 50_000  # started together, the second writer meets the first one's lease (and waits) whatever the size
FIXTURES = Path(__file__).resolve().parent / "fixture_stages"


def _big(folder: Path, store: str, rows: int = ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "big.jsonl"
    with open(source, "w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "instruction": f"Write sentence number {i} about the sea.",
                        "response": f"This is sentence {i}: the sea is wide and deep.",
                    }
                )
                + "\n"
            )
    return write_recipe(
        folder,
        {
            "prepare-big": {
                "stage": "prepare",
                "inputs": {"source": str(source)},
                "config": {"format": "columns", "columns": {"user": "instruction", "assistant": "response"}},
            }
        },
        store=store,
    )


def _writer(recipe: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(PY), "-m", "stages.prepare", "--recipe", str(recipe), "--step", "prepare-big", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def _finish(p: subprocess.Popen) -> tuple[int, list[dict[str, Any]], str]:
    out, err = p.communicate(timeout=600)
    return p.returncode, events(out), out[-3000:] + err[-3000:]


def _one_result(store_url: str) -> dict[str, Any]:
    """The committed result: every file hashes as its manifest says, nothing else lies in the output folders,
    every row is there once, and no work area is left."""
    store = Store(store_url)
    # re-hashes every file: DataError on a mix of two writers
    manifest = store.verify_step("r", "prepare-big")
    for entry in manifest["outputs"].values():
        listed = {store.path("r", "prepare-big", f["path"]) for f in entry["files"]}
        folder = store.path("r", "prepare-big", entry["path"])
        present = set(store.fs.find(folder)) if store.fs.exists(folder) else set()
        assert {p.rstrip("/") for p in present} == listed, f"files beside the manifest's in {folder}"
    assert manifest["counts"]["rows_in"] == ROWS and manifest["outputs"]["data"]["rows"] == ROWS
    assert not store.fs.exists(store.path("r", "prepare-big", "_work")), "a work area was left behind"
    return manifest


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    if request.param == "local":
        return str(tmp_path / "store"), {}
    env = request.getfixturevalue("s3")
    return f"s3://hala-store/{tmp_path.name}", env


def test_two_writers_started_together_commit_one_result(
    tmp_path: Path, store_url: tuple[str, dict[str, str]]
) -> None:
    url, env = store_url
    recipe = _big(tmp_path, url)
    t0 = time.monotonic()
    writers = [_writer(recipe, env), _writer(recipe, env)]
    results = [_finish(p) for p in writers]
    seconds = time.monotonic() - t0
    codes = [code for code, _, _ in results]
    assert all(code in (0, 75) for code in codes) and 0 in codes, [text for *_, text in results]
    committed = [evs for _, evs, _ in results if any(e.get("event") == "committed" for e in evs)]
    assert len(committed) == 1, "exactly one writer commits"
    loser = next(evs for _, evs, _ in results if evs is not committed[0])
    assert any(e.get("event") == "cached" for e in loser)
    waited = [e for e in loser if e.get("event") == "waiting for another writer"]
    manifest = _one_result(url)
    print(
        f"\n[two writers, {url.split(':')[0] if '://' in url else 'local'}] {ROWS} rows: exit codes {codes}, "
        f"the second waited: {bool(waited)}, both done in {seconds:.1f} s, committed at "
        f"{manifest['timings']['finished']}"
    )


def test_a_writer_killed_while_holding_the_lease_is_replaced(
    tmp_path: Path, store_url: tuple[str, dict[str, str]]
) -> None:
    """SIGKILL of the first writer at the write of its manifest (its data all written under its lease, nothing
    committed): the next one takes the lease at once (the kernel dropped the flock; on S3 the holder was a
    dead process of this machine) and commits all rows. The kill is a crash point, not a sleep: a fast machine
    once finished the whole step inside the second the test used to wait."""
    url, env = store_url
    recipe = _big(tmp_path, url)
    match = (
        r"^link \S*/prepare-big/\._MANIFEST"
        if "://" not in url
        else r"^s3\.put_object \S*/prepare-big/_MANIFEST\.json"
    )
    root = str(tmp_path / "store") if "://" not in url else url
    first = _writer(
        recipe,
        crashpoints.env(root, tmp_path / "count", at=1, mode="kill", match=match, base={**os.environ, **env}),
    )
    first.communicate(timeout=600)
    assert first.returncode == -signal.SIGKILL, (
        f"the first writer ended with {first.returncode}, not at its crash point"
    )
    assert not Store(url).fs.exists(Store(url).path("r", "prepare-big", "_MANIFEST.json"))
    t0 = time.monotonic()
    code, evs, text = _finish(_writer(recipe, env))
    assert code == 0, text
    assert any(e.get("event") == "committed" for e in evs)
    if "://" in url:
        assert any(e.get("event") == "took over a lease its holder stopped renewing" for e in evs)
    _one_result(url)
    print(
        f"\n[killed holder, {url.split(':')[0] if '://' in url else 'local'}] the next writer committed in "
        f"{time.monotonic() - t0:.1f} s"
    )


def test_a_lease_of_another_machine_is_taken_over_after_its_ttl(tmp_path: Path, s3: dict[str, str]) -> None:
    """A lease object left by a holder elsewhere (a node that died) is taken over once it has not changed for
    a TTL of the waiter's own clock, not before."""
    url = f"s3://hala-store/{tmp_path.name}"
    recipe = _big(tmp_path, url, rows=ROWS)
    store = Store(url)
    stale = {
        "host": "node-that-died",
        "pid": 1,
        "pid_namespace": "pid:[1]",
        "boot_id": "x",
        "token": "t",
        "ttl": 4,
        "since": "2026-12-02T00:00:00+00:00",
        "renewed": "2026-12-02T00:00:00+00:00",
    }
    store.fs.pipe(store.path("r", "_leases", "prepare-big.json"), json.dumps(stale).encode())
    t0 = time.monotonic()
    code, evs, text = _finish(_writer(recipe, {**s3, "HALA_LEASE_TTL": "4"}))
    waited = time.monotonic() - t0
    assert code == 0, text
    names = [e.get("event") for e in evs]
    assert (
        names.index("waiting for another writer")
        < names.index("took over a lease its holder stopped renewing")
        < names.index("committed")
    )
    took = next(e for e in evs if e.get("event") == "took over a lease its holder stopped renewing")
    assert "node-that-died" in took["holder"] and waited >= 4
    _one_result(url)
    assert not store.fs.exists(store.path("r", "_leases", "prepare-big.json")), "a released lease is deleted"


def test_two_runs_of_a_sharded_dag_on_one_store(tmp_path: Path) -> None:
    """Two `hala run` of the same recipe at once: every shard, the gather and the step after it commit
    once."""
    rows = tmp_path / "rows.jsonl"
    tmp_path.mkdir(exist_ok=True)
    rows.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(40)))
    recipe = write_recipe(
        tmp_path,
        {
            "echo-rows": {
                "stage": "echo",
                "shards": 4,
                "inputs": {"data": str(rows)},
                "config": {"quarantine_every": 5, "sleep_s": 0.02},
            },
            "echo-again": {"stage": "echo", "inputs": {"data": str(rows), "after": "echo-rows"}},
        },
    )
    env = {
        **os.environ,
        "HALA_STAGES_PATH": str(FIXTURES),
        "HALA_WARM": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")])),
    }
    import sys

    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "hala.ops.cli", "run", str(recipe)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [o[0][-2000:] + o[1][-2000:] for o in outs]
    store = Store(str(tmp_path / "store"))
    for step in ("echo-rows", "echo-again"):
        store.verify_step("r", step)
        assert not store.fs.exists(store.path("r", step, "_work"))
    status = hala("status", "r", "--store", str(tmp_path / "store"), "--json", env=env)
    assert {r["state"] for r in json.loads(status.stdout)} == {"committed"}
    rows_out = json.loads((tmp_path / "store" / "r" / "echo-rows" / "_MANIFEST.json").read_text())["counts"]
    assert rows_out["rows_in"] == 40 and rows_out["rows_out"] + rows_out["rows_quarantined"] == 40
