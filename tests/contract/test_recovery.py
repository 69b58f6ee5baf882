"""Recovery paths (issue 32): each test is one of the findings that the commit protocol answers, made to
happen for real: a crash at a chosen store operation (tests/_lib/crashpoints.py), a process frozen with
SIGSTOP past its lease, a store that goes away (tests/_lib/faultproxy.py), a store moved to another path. On
the code before the protocol each of them failed; they say what a user sees instead now.

The crash at *every* operation, on every store, is tests/contract/test_crashpoints.py (a sample) and
bench/crashpoints.py (all of them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import crashcases
import crashpoints
from faultproxy import FaultProxy
from hala.contract import lease, logs
from hala.contract.errors import EXIT_CONFIG, EXIT_TEMPORARY, exit_code_for
from hala.contract.store import Store
from helpers import REPO, events, hala, manifest, write_recipe

FIXTURES = Path(__file__).resolve().parent / "fixture_stages"
DATA_PY = str(REPO / ".venvs" / "data" / "bin" / "python")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "HALA_STAGES_PATH": str(FIXTURES),
        "PYTHONPATH": path,
        "HALA_LOG_FORMAT": "json",
        "HALA_WARM": "0",
        **(extra or {}),
    }


def _echo(folder: Path, url: str, shards: int = 3, rows: int = 12, **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(rows)))
    return write_recipe(
        folder,
        {"echo-rows": {"stage": "echo", "shards": shards, "inputs": {"data": str(data)}, "config": config}},
        store=url,
    )


def _shard(recipe: Path, shard: str | None, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "echo_stage", "--recipe", str(recipe), "--step", "echo-rows", *extra]
    if shard:
        cmd += ["--shard", shard]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hala.ops.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the process froze itself at its crash point (state T), or fail saying how it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the process ended (exit {proc.returncode}) before its stop point: "
                f"{out[-2000:]}{err[-2000:]}"
            )
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the process never reached its stop point")


@contextlib.contextmanager
def _frozen_writer(
    tmp_path: Path, kind: str, match: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, dict[str, str], list[str], subprocess.Popen]]:
    """A store of `kind` on 127.0.0.1 with the `step` recipe on it, and a writer of that step started under a
    crash plan that freezes it (mode stop) at its first store operation matching `match`: (store URL, the
    environment of other writers, the step command, the writer). This process gets the store's variables too:
    it reads the store."""
    with crashcases.store(kind) as where:
        for key, value in where.env.items():
            monkeypatch.setenv(key, value)
        url = where.url_for(tmp_path)
        recipe = crashcases.recipe("step", tmp_path, url)
        env = {**_env(where.env), "HALA_LEASE_TTL": "2"}
        cmd = crashcases.commands("step", recipe, url)[0]
        plan = crashpoints.env(
            where.root(tmp_path), tmp_path / "count", at=1, mode="stop", base=env, match=match
        )
        yield (
            url,
            env,
            cmd,
            subprocess.Popen(
                cmd, cwd=REPO, env=plan, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )


def _rows(store: Store, run: str, step: str) -> list[int]:
    """The `n` of every committed row of an echo step, its files verified first (JSON lines, or parquet
    chunks)."""
    import io

    import pyarrow.parquet as pq

    m = store.verify_step(run, step)
    lines: list[str] = []
    for f in m["outputs"]["data"]["files"]:
        data = store.fs.cat_file(store.path(run, step, f["path"]))
        lines += (
            pq.read_table(io.BytesIO(data)).column("line").to_pylist()
            if f["path"].endswith(".parquet")
            else data.decode().splitlines()
        )
    return sorted(json.loads(line)["n"] for line in lines)


# 1 ----------------------------------------------------------------------------------------------------------
def test_a_gather_killed_partway_is_retried_and_commits(tmp_path: Path) -> None:
    """The gather is killed after it placed one of the three parts' files (it used to move them out of the
    parts, so a retry said 'part file missing' (exit 3) and a rerun of the shard said cached): the retried
    gather commits."""
    url = str(tmp_path / "store")
    recipe = _echo(tmp_path, url, quarantine_every=3)
    env = _env()
    assert [_shard(recipe, f"{i}/3", env).returncode for i in range(3)] == [0, 0, 0]
    # the second placement of a shard's file into the step's output (a link or a move out of the work area)
    plan = crashpoints.env(
        url,
        tmp_path / "count",
        at=2,
        mode="kill",
        base=env,
        match=r"^(link|rename|replace) \S*/_work/\S+ \S*/echo-rows/(?!_work)",
    )
    killed = _cli(plan, "gather", str(recipe), "echo-rows")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (tmp_path / "store" / "r" / "echo-rows" / "_MANIFEST.json").exists()
    assert all(_shard(recipe, f"{i}/3", env).returncode == 0 for i in range(3))
    again = _cli(env, "gather", str(recipe), "echo-rows")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert _rows(Store(url), "r", "echo-rows") == [n for n in range(12) if (n // 3 + 1) % 3]
    assert _cli(env, "verify", "r", "echo-rows", "--store", url).returncode == 0


# 2 ----------------------------------------------------------------------------------------------------------
def test_a_retried_shard_on_s3_commits_its_own_bytes(tmp_path: Path, s3: dict[str, str]) -> None:
    """A shard killed between its upload and its part, then run again, and a shard forced later: each attempt
    writes different bytes (`stamp`), and what the step commits is each part's own files (fsspec's put used to
    nest the new files under the old attempt's folder, and the part listed the old files with the new
    hashes)."""
    url = f"s3://hala-store/{tmp_path.name}"
    recipe = _echo(tmp_path, url, stamp=True)
    env = _env(s3)
    plan = crashpoints.env(
        "s3://", tmp_path / "count", at=1, mode="kill", base=env, match=r"^s3\.put_object \S*_PART\.json"
    )
    assert _shard(recipe, "0/3", plan).returncode == -signal.SIGKILL
    for i in range(3):
        assert _shard(recipe, f"{i}/3", env).returncode == 0
    assert _cli(env, "gather", str(recipe), "echo-rows").returncode == 0
    assert _cli(env, "verify", "r", "echo-rows", "--store", url).returncode == 0
    before = _rows(Store(url), "r", "echo-rows")
    # forced: every shard writes new bytes into new attempts, and the gather commits them in place of the
    # first ones
    forced = [_shard(recipe, f"{i}/3", env, "--force") for i in range(3)]
    assert [f.returncode for f in forced] == [0, 0, 0], forced[0].stdout[-2000:]
    gathered = _cli(env, "gather", str(recipe), "echo-rows")
    assert gathered.returncode == 0, gathered.stdout[-2000:] + gathered.stderr[-2000:]
    verified = _cli(env, "verify", "r", "echo-rows", "--store", url)
    assert verified.returncode == 0, verified.stderr[-2000:]
    store = Store(url)
    assert _rows(store, "r", "echo-rows") == before == list(range(12))
    attempts = [
        next(e["attempt"] for e in events(f.stdout) if e.get("event") == "part committed") for f in forced
    ]
    parts = {p["shard"]: p["attempt"] for p in store.read_manifest("r", "echo-rows")["shards"]["parts"]}
    assert [parts[i] for i in range(3)] == attempts, "the gather committed the forced shards' parts"


# 3 ----------------------------------------------------------------------------------------------------------
def test_a_writer_whose_local_lock_was_reclaimed_stops_before_its_next_chunk(tmp_path: Path) -> None:
    """On a ReadWriteMany volume a partitioned pod does not learn that its lock was given to another: here the
    lock file is replaced under a frozen writer, a second writer commits, and the first one, woken, stops with
    75 at its next chunk instead of writing on and committing over the second."""
    url = str(tmp_path / "store")
    recipe = _echo(tmp_path, url, shards=1, rows=12, chunk_rows=2)
    env = _env()
    plan = crashpoints.env(
        url, tmp_path / "count", at=2, mode="stop", base=env, match=r"^link \S*/chunks/_done/"
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "echo_stage", "--recipe", str(recipe), "--step", "echo-rows"],
        cwd=REPO,
        env=plan,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_stopped(first)
        (
            tmp_path / "store" / "r" / "_leases" / "echo-rows.lock"
        ).unlink()  # the lock reclaimed for another client
        second = _shard(recipe, None, env)
        assert second.returncode == 0, second.stdout[-2000:]
        committed = manifest(tmp_path / "store", "r", "echo-rows")
    finally:
        crashpoints.resume(first, tmp_path / "count")
    out, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_TEMPORARY, out[-2000:] + err[-2000:]
    assert any(
        "lost the lease" in e.get("error", "") or "another writer" in e.get("error", "")
        for e in events(out)
        if e.get("event") == "failed"
    )
    assert manifest(tmp_path / "store", "r", "echo-rows") == committed, "the second writer's commit stays"
    assert [p.name for p in (tmp_path / "store" / "r" / "echo-rows").glob("attempt-*")] == [
        f"attempt-{committed['attempt']}"
    ]
    assert _rows(Store(url), "r", "echo-rows") == list(range(12))


@pytest.mark.parametrize("kind", ["local", "s3", "gcs"])
def test_a_writer_frozen_at_its_manifest_write_past_the_ttl_loses_to_the_conditional_write(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is only an optimisation: a writer frozen (SIGSTOP) at the very write of its manifest, after
    its last lease check, while another takes over (after the TTL on object stores; on a local store its lock
    file reclaimed) and commits. Woken, its conditional write fails: it removes its own files and reports the
    winner (exit 0, same fingerprint); the winner's manifest is not touched. It used to replace it."""
    match = {
        "local": r"^link \S*/prepare-x/\._MANIFEST",
        "s3": r"^s3\.put_object \S*/prepare-x/_MANIFEST\.json",
        "gcs": r"^gcs\.POST .*prepare-x/_MANIFEST\.json",
    }[kind]
    with _frozen_writer(tmp_path, kind, match, monkeypatch) as (url, env, cmd, first):
        try:
            _wait_stopped(first)
            if kind == "local":
                (tmp_path / "store" / "r" / "_leases" / "prepare-x.lock").unlink()
            else:
                time.sleep(3)  # past the TTL: the frozen holder renews nothing
            second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
            store = Store(url)
            won = store.read_manifest("r", "prepare-x")
            assert won is not None
        finally:
            crashpoints.resume(first, tmp_path / "count")
        out, err = first.communicate(timeout=300)
        assert first.returncode in (0, EXIT_TEMPORARY), out[-2000:] + err[-2000:]
        if first.returncode == 0:
            assert any(e.get("event") == "cached" and "lost_to" in e for e in events(out)), out[-2000:]
        assert store.read_manifest("r", "prepare-x") == won, "the winner's manifest was replaced"
        store.verify_step("r", "prepare-x")
        store.fs.invalidate_cache()
        attempts = {
            p.rstrip("/").rsplit("/", 1)[-1]
            for p in store.fs.ls(store.path("r", "prepare-x"), detail=False)
            if "attempt-" in p
        }
        assert attempts == {f"attempt-{won['attempt']}"}, "the loser's files were left"


def test_a_lease_taken_over_on_gcs_is_lost_by_its_old_holder_not_overwritten(tmp_path: Path) -> None:
    """GCS renewal, takeover and release are conditional on the generation: a holder whose lease another
    process replaced learns it at its next renewal, stops (exit 75 at its check), and its release leaves the
    new one alone."""
    import gcsserver
    from hala.contract import cas

    with gcsserver.serve("hala-lease"):
        store = Store(f"gs://hala-lease/{tmp_path.name}")
        os.environ["HALA_LEASE_TTL"] = "2"
        try:
            with lease.held(store, "r", "x", logs.get("test")) as held:
                mine = held.version
                theirs = cas.write(store.fs, held.path, b'{"token": "the other writer"}', mine)  # a takeover
                deadline = time.monotonic() + 5
                while held.lost is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                with pytest.raises(Exception) as lost:
                    held.check()
                assert exit_code_for(lost.value) == EXIT_TEMPORARY and "another writer replaced it" in str(
                    lost.value
                )
        finally:
            os.environ.pop("HALA_LEASE_TTL", None)
        version, body = cas.read(store.fs, store.path("r", "_leases", "x.json"))
        assert (version, body) == (theirs, b'{"token": "the other writer"}'), (
            "the old holder renewed or deleted it"
        )


def test_a_renewal_whose_answer_was_lost_is_not_taken_for_a_loss(
    tmp_path: Path, s3: dict[str, str], proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 applied a renewal and its answer was lost (a 500 after the write); botocore retried the conditional
    PUT and got 412, since the ETag had changed: that is this holder's own write, not another writer's."""
    # TTL 8 s: a renewal every 2 s, lost after 6 s without one. With 2 s (0.5 s and 1.5 s) the retried
    # renewal's backoff on a loaded machine (CI runs two suites at once) outlasted the holder's patience: a
    # flaky "lost"
    for key, value in {**s3, "AWS_ENDPOINT_URL": proxy.url, "HALA_LEASE_TTL": "8"}.items():
        monkeypatch.setenv(key, value)
    store = Store(f"s3://hala-store/{tmp_path.name}")
    with lease.held(store, "r", "x", logs.get("test")) as held:
        proxy.target(r"^PUT \S*/_leases/x\.json", "internal", 1)
        deadline = time.monotonic() + 15
        while proxy.counts["internal"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # the retried request's 412 has come back, and another renewal has gone through
        assert proxy.counts["internal"] == 1
        held.check()  # not lost
        assert held.lost is None


# 4: tests/models/test_tiny_models.py (a second spec is a second folder; the first one stays as it was)
# ----------------


# 5 ----------------------------------------------------------------------------------------------------------
def test_a_store_moved_to_another_path_resumes_its_chunks(tmp_path: Path) -> None:
    """A step killed after some chunks, its store then mounted elsewhere (a host folder against /store in a
    container): the rerun resumes the chunks already written (markers hold paths relative to the chunks'
    folder) and commits."""
    url = str(tmp_path / "here")
    recipe = _echo(tmp_path, url, shards=1, rows=12, chunk_rows=2)
    plan = crashpoints.env(
        url, tmp_path / "count", at=3, mode="kill", base=_env(), match=r"^link \S*/chunks/_done/"
    )
    assert _shard(recipe, None, plan).returncode == -signal.SIGKILL
    moved = tmp_path / "there"
    shutil.move(str(tmp_path / "here"), moved)
    rerun = _shard(recipe, None, _env(), "--store", str(moved))
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    reused = [e["chunk"] for e in events(rerun.stdout) if e.get("event") == "chunk already committed"]
    assert reused == [0, 1], [e.get("event") for e in events(rerun.stdout)]
    assert _rows(Store(str(moved)), "r", "echo-rows") == list(range(12))


# 6 ----------------------------------------------------------------------------------------------------------
def test_verify_says_when_there_is_nothing_to_verify_and_checks_the_artifacts(tmp_path: Path) -> None:
    assert hala("verify", "nosuchrun", "--store", str(tmp_path / "nonexistent")).returncode == EXIT_CONFIG
    url = str(tmp_path / "store")
    recipe = crashcases.recipe("step", tmp_path, url)
    assert subprocess.run(crashcases.commands("step", recipe, url)[0], cwd=REPO, env=_env()).returncode == 0
    named = hala("verify", "r", "prepare-x", "no-such-step", "--store", url)
    assert named.returncode == EXIT_CONFIG and "no-such-step" in named.stderr
    assert hala("verify", "r", "prepare-x", "--store", url).returncode == 0
    # an artifact of the store (a content-addressed `_sources/` folder) is verified with every run
    art = Path(url) / "_sources" / "tiny-x-0123456789abcdef"
    shutil.copytree(Path(url) / "r" / "prepare-x", art)
    ok = hala("verify", "r", "--store", url)
    assert ok.returncode == 0 and ("1 artifacts" in ok.stdout or '"artifacts": 1' in ok.stdout), (
        ok.stdout + ok.stderr
    )
    damaged = next(art.glob("attempt-*/data/*.parquet"))
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")
    bad = hala("verify", "r", "--store", url)
    assert bad.returncode == 3 and damaged.name in bad.stderr and "_sources" in bad.stderr


# 7 ----------------------------------------------------------------------------------------------------------
def test_a_shared_store_gets_the_group_s_permissions_and_data_reaches_disk_before_its_manifest(
    tmp_path: Path,
) -> None:
    """Written under umask 002 (a group's shared store): every file 664 and every folder 775, the manifest and
    the status files too (they were 600). The operations, in order: each data file fsynced, its folder
    fsynced, then the manifest linked into place, then the step's folder fsynced."""
    url = str(tmp_path / "store")
    recipe = crashcases.recipe("step", tmp_path, url)
    env = crashpoints.env(url, tmp_path / "count", at=0, log=tmp_path / "ops", base=_env())
    proc = subprocess.run(
        crashcases.commands("step", recipe, url)[0], cwd=REPO, env=env, preexec_fn=lambda: os.umask(0o002)
    )
    assert proc.returncode == 0
    step = tmp_path / "store" / "r" / "prepare-x"
    for path in (tmp_path / "store").rglob("*"):
        if path.name.endswith(".lock"):
            continue
        assert (path.stat().st_mode & 0o777) == (0o775 if path.is_dir() else 0o664), path
    ops = [line.split("\t")[2].strip() for line in (tmp_path / "ops").read_text().splitlines()]
    link = next(
        i for i, op in enumerate(ops) if op.startswith("link ") and op.endswith(f"{step}/_MANIFEST.json")
    )
    m = manifest(tmp_path / "store", "r", "prepare-x")
    for f in (f for out in m["outputs"].values() for f in out["files"]):
        synced = [i for i, op in enumerate(ops) if op == f"fsync {step / f['path']}"]
        folder = [i for i, op in enumerate(ops) if op == f"fsync {(step / f['path']).parent}"]
        assert synced and folder and max(synced) < min(folder) < link, f["path"]
    assert any(op == f"fsync {step}" for op in ops[link + 1 :]), (
        "the folder holding the new manifest is fsynced"
    )


# 8 ----------------------------------------------------------------------------------------------------------
def test_paths_from_a_manifest_and_the_run_name_are_checked(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    recipe = crashcases.recipe("step", tmp_path, url)
    assert subprocess.run(crashcases.commands("step", recipe, url)[0], cwd=REPO, env=_env()).returncode == 0
    path = tmp_path / "store" / "r" / "prepare-x" / "_MANIFEST.json"
    m = json.loads(path.read_text())
    m["outputs"]["data"]["files"][0]["path"] = "../../../escaped.parquet"
    path.write_text(json.dumps(m))
    bad = hala("verify", "r", "prepare-x", "--store", url)
    assert bad.returncode == 3 and "escaped.parquet" in bad.stderr and "leaves its folder" in bad.stderr
    assert not (tmp_path / "escaped.parquet").exists()
    run = hala("run", str(recipe), "--run", "../other", "--dry-run")
    assert run.returncode == EXIT_CONFIG and "--run" in run.stderr


def test_a_manifest_path_out_of_the_cache_is_refused_when_an_object_store_input_is_localized(
    tmp_path: Path,
) -> None:
    import fsspec

    from hala.contract.errors import DataError

    fs = fsspec.filesystem("memory")
    fs.pipe("/recovery/r/s/attempt-a/model/w.bin", b"w")
    import hashlib

    sha = hashlib.sha256(b"w").hexdigest()
    for bad_path, bad_sha in (("../../../../escaped", sha), ("attempt-a/model/w.bin", "../../x")):
        m = {
            "fingerprint": "k",
            "outputs": {
                "model": {
                    "path": "attempt-a/model",
                    "files": [{"path": bad_path, "bytes": 1, "sha256": bad_sha}],
                }
            },
        }
        with pytest.raises(DataError):
            Store("memory://recovery").localize("r", "s", m, "model")
    assert not list(Path(tmp_path).glob("**/escaped"))


# 9 ----------------------------------------------------------------------------------------------------------
def test_gcs_errors_map_to_the_codes_of_s3_s(tmp_path: Path) -> None:
    """What gcsfs raises once its own retries are spent, made by its own response check: 429 and 408 are worth
    a retry (75), 403 needs other credentials (2). And end to end: a store that refuses every request."""
    from gcsfs.retry import validate_response

    def raised(status: int) -> BaseException:
        try:
            validate_response(status, json.dumps({"error": {"code": status, "message": "m"}}).encode(), "b/o")
        except BaseException as e:  # noqa: BLE001 - what gcsfs raises is the point
            return e
        raise AssertionError(status)

    assert exit_code_for(raised(429)) == EXIT_TEMPORARY
    assert exit_code_for(raised(408)) == EXIT_TEMPORARY
    assert exit_code_for(raised(503)) == EXIT_TEMPORARY
    assert exit_code_for(raised(403)) == EXIT_CONFIG
    import gcsserver

    with gcsserver.serve("hala-denied") as genv:
        proxy = FaultProxy(genv["STORAGE_EMULATOR_HOST"], rates={"deny": 1.0}).start()
        try:
            url = f"gs://hala-denied/{tmp_path.name}"
            recipe = crashcases.recipe("step", tmp_path, url)
            env = _env({**genv, "STORAGE_EMULATOR_HOST": proxy.url})
            out = subprocess.run(
                crashcases.commands("step", recipe, url)[0],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            proxy.stop()
    assert out.returncode == EXIT_CONFIG, out.stdout[-2000:] + out.stderr[-2000:]


# 10 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_writer_that_gets_the_lease_just_after_a_commit_finds_it(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second writer looked for a commit (none yet), then took the lease without waiting, just after the
    first one committed and released it: it finds that commit (it used to recompute and commit again)."""
    match = {
        "local": r"^open \S*/_leases/prepare-x\.lock",
        "s3": r"^s3\.put_object \S*/_leases/prepare-x\.json",
    }[kind]
    with _frozen_writer(tmp_path, kind, match, monkeypatch) as (url, env, cmd, late):
        try:
            _wait_stopped(late)  # frozen right before it takes the lease, its first look behind it
            first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert first.returncode == 0 and any(e.get("event") == "committed" for e in events(first.stdout))
            committed = Store(url).read_manifest("r", "prepare-x")
        finally:
            crashpoints.resume(late, tmp_path / "count")
        out, err = late.communicate(timeout=300)
        assert late.returncode == 0, out[-2000:] + err[-2000:]
        names = [e.get("event") for e in events(out)]
        assert "cached" in names and "committed" not in names and "start" not in names, names
        assert committed is not None and Store(url).read_manifest("r", "prepare-x") == committed


# 12 ---------------------------------------------------------------------------------------------------------
def test_a_run_after_a_store_outage_heals_in_one_go(
    tmp_path: Path, s3: dict[str, str], proxy: FaultProxy
) -> None:
    """The store goes away while the shards of a 2-shard step commit their parts (every request reset): the
    run ends with 75; the next run, the store back, commits the step (it used to need one run more: the gather
    missed a part)."""
    url = f"s3://hala-store/{tmp_path.name}"
    recipe = _echo(tmp_path, url, shards=2, rows=20, chunk_rows=2)
    env = _env(
        {
            **s3,
            "AWS_ENDPOINT_URL": proxy.url,
            "HALA_LEASE_TTL": "3",
            "FSSPEC_S3": json.dumps(
                {
                    "config_kwargs": {
                        "retries": {"mode": "standard", "total_max_attempts": 2},
                        "connect_timeout": 1,
                        "read_timeout": 2,
                    }
                }
            ),
        }
    )
    proxy.hold(r"^PUT \S*/_work/\S*/chunks/_done/000003\.json")

    def outage() -> None:
        if proxy.held.wait(timeout=300):
            proxy.set_rates({"down": 1.0})
            proxy.release_held(forward=False)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    first = _cli(env, "run", str(recipe))
    thread.join(timeout=10)
    proxy.set_rates({})
    assert first.returncode == EXIT_TEMPORARY, first.stdout[-2000:] + first.stderr[-2000:]
    second = _cli(env, "run", str(recipe))
    store = Store(url)
    store.fs.invalidate_cache()
    assert second.returncode == 0, "\n".join(store.fs.find(store.path("r"))) + first.stdout[-6000:]
    assert _rows(Store(url), "r", "echo-rows") == list(range(20))


# hala gc ----------------------------------------------------------------------------------------------------
def test_gc_leaves_a_running_writer_and_young_files_alone_and_takes_a_killed_attempt(tmp_path: Path) -> None:
    """A writer frozen before its commit holds its lease: `hala gc` skips its step whatever the grace. Killed,
    its attempt is garbage, kept while younger than the grace period, then listed, removed, and the rerun's
    commit verifies."""
    url = str(tmp_path / "store")
    recipe = crashcases.recipe("step", tmp_path, url)
    cmd = crashcases.commands("step", recipe, url)[0]
    plan = crashpoints.env(
        url, tmp_path / "count", at=1, mode="stop", base=_env(), match=r"^link \S*/prepare-x/\._MANIFEST"
    )
    writer = subprocess.Popen(
        cmd, cwd=REPO, env=plan, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_stopped(writer)
        busy = json.loads(hala("gc", "r", "--store", url, "--grace", "0", "--json").stdout)
        assert busy["busy"] == ["r/prepare-x"] and not busy["files"]
    finally:
        writer.kill()
        writer.communicate(timeout=60)
    assert hala("run", str(recipe)).returncode == 0
    young = json.loads(hala("gc", "r", "--store", url, "--json").stdout)
    assert not young["files"] and young["younger_than_grace"] >= 3  # two data files and a quarantine file
    status = hala("status", "r", "--store", url)
    assert "garbage" in status.stdout, status.stdout
    removed = json.loads(hala("gc", "r", "--store", url, "--grace", "0", "--delete", "--json").stdout)
    committed = manifest(tmp_path / "store", "r", "prepare-x")["attempt"]
    assert removed["files"] and all(
        "/prepare-x/attempt-" in f["path"] and committed not in f["path"] for f in removed["files"]
    )
    assert [p.name for p in (tmp_path / "store" / "r" / "prepare-x").glob("attempt-*")] == [
        f"attempt-{committed}"
    ]
    assert hala("verify", "r", "prepare-x", "--store", url).returncode == 0
