"""Sharded steps: N shard processes commit parts under _work/, only `hala gather` writes the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, events, hala, manifest, write_recipe

FIXTURES = Path(__file__).resolve().parent / "fixture_stages"


@pytest.fixture(autouse=True)
def _echo_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `echo` test stage: found through HALA_STAGES_PATH, imported through PYTHONPATH."""
    monkeypatch.setenv("HALA_STAGES_PATH", str(FIXTURES))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    )


def _recipe(tmp_path: Path, rows: int = 10, shards: int = 3, **config) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(rows)))
    return write_recipe(
        tmp_path,
        {"echo-rows": {"stage": "echo", "shards": shards, "inputs": {"data": str(data)}, "config": config}},
    )


def _shard(recipe: Path, shard: str | None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "echo_stage", "--recipe", str(recipe), "--step", "echo-rows"]
    if shard:
        cmd += ["--shard", shard]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)


def test_runner_runs_every_shard_then_gathers(tmp_path: Path) -> None:
    path = _recipe(tmp_path, rows=10, shards=3, quarantine_every=2)
    result = hala("run", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    m = manifest(tmp_path / "store", "r", "echo-rows")
    assert m["counts"] == {"rows_in": 10, "rows_out": 6, "rows_quarantined": 4, "rows_removed": {}}
    assert m["quarantine"]["by_reason"] == {"every_kth": 4}
    assert m["shards"]["count"] == 3 and len(m["timings"]["shard_seconds"]) == 3
    files = sorted(f["path"] for f in m["outputs"]["data"]["files"])
    # the gather's own attempt folder, the shards' files renamed into it (never moved out of their parts)
    assert m["outputs"]["data"]["path"] == f"attempt-{m['attempt']}/data"
    assert files == [f"attempt-{m['attempt']}/data/s0000{i}-rows.jsonl" for i in range(3)]
    assert [p["shard"] for p in m["shards"]["parts"]] == [0, 1, 2]
    got = sorted(
        json.loads(line)["n"]
        for f in files
        for line in (tmp_path / "store" / "r" / "echo-rows" / f).read_text().splitlines()
    )
    assert len(got) == len(set(got)) == 6
    assert not (tmp_path / "store" / "r" / "echo-rows" / "_work").exists()
    again = hala("run", str(path))
    assert {e["state"] for e in events(again.stdout) if e.get("event") == "summary"} == {"cached"}


def test_a_forced_sharded_step_commits_its_new_result(tmp_path: Path) -> None:
    # issue 18: `--force` reran every shard, then gather found the old manifest with the same fingerprint,
    # said cached, kept the old outputs and left the new parts in _work/ while the run summary said done
    path = _recipe(tmp_path, rows=10, shards=3)
    assert hala("run", str(path)).returncode == 0
    step_dir = tmp_path / "store" / "r" / "echo-rows"
    before = manifest(tmp_path / "store", "r", "echo-rows")
    # what the rerun must replace, not keep
    (step_dir / before["outputs"]["data"]["files"][1]["path"]).write_text("")
    forced = hala("run", str(path), "--force", "echo-rows")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr
    after = manifest(tmp_path / "store", "r", "echo-rows")
    assert after["fingerprint"] == before["fingerprint"]
    assert after["timings"]["started"] > before["timings"]["finished"]  # a new commit, from the new parts
    assert not (step_dir / "_work").exists()  # nothing left behind
    rows = sorted(
        json.loads(line)["n"]
        for f in after["outputs"]["data"]["files"]
        for line in (step_dir / f["path"]).read_text().splitlines()
    )
    assert rows == list(range(10))
    assert [e for e in events(forced.stdout) if e.get("event") == "gathered"]
    assert not [e for e in events(forced.stdout) if e.get("event") == "cached"]
    assert hala("verify", "r", "--store", str(tmp_path / "store")).returncode == 0
    # a forced rerun of one shard only (a pod rerun by hand) leaves the committed result standing
    assert _shard(path, "1/3").returncode == 0  # cached: the step is committed
    forced_one = subprocess.run(
        [
            sys.executable,
            "-m",
            "echo_stage",
            "--recipe",
            str(path),
            "--step",
            "echo-rows",
            "--shard",
            "1/3",
            "--force",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert forced_one.returncode == 0 and (step_dir / "_work").exists()
    gathered = hala("gather", str(path), "echo-rows")
    assert gathered.returncode == 0 and not (step_dir / "_work").exists()
    assert manifest(tmp_path / "store", "r", "echo-rows") == after


def test_gather_waits_for_every_shard(tmp_path: Path) -> None:
    path = _recipe(tmp_path, rows=9, shards=3)
    assert _shard(path, "0/3").returncode == 0
    assert _shard(path, None, env={"JOB_COMPLETION_INDEX": "2"}).returncode == 0  # an Indexed Job pod
    early = hala("gather", str(path), "echo-rows")
    assert early.returncode == 75
    assert "1 of 3 shards have not committed their part (missing: 1)" in early.stderr
    assert not (tmp_path / "store" / "r" / "echo-rows" / "_MANIFEST.json").exists()
    assert _shard(path, "1/3").returncode == 0
    # a shard whose part is committed does no work again (a retried pod)
    again = _shard(path, "1/3")
    assert again.returncode == 0 and any(e.get("event") == "cached" for e in events(again.stdout))
    done = hala("gather", str(path), "echo-rows")
    assert done.returncode == 0, done.stderr
    assert manifest(tmp_path / "store", "r", "echo-rows")["counts"]["rows_out"] == 9


def test_gather_refuses_a_damaged_part(tmp_path: Path) -> None:
    path = _recipe(tmp_path, rows=6, shards=2)
    for i in range(2):
        assert _shard(path, f"{i}/2").returncode == 0
    part = next(
        (tmp_path / "store" / "r" / "echo-rows" / "_work").rglob("00001-of-00002/attempt-*/data/rows.jsonl")
    )
    part.write_text(part.read_text()[:-3])
    result = hala("gather", str(path), "echo-rows")
    assert result.returncode == 3 and "shard 1" in result.stderr and "rows.jsonl" in result.stderr


def test_rows_that_do_not_add_up_are_not_committed(tmp_path: Path) -> None:
    path = _recipe(tmp_path, rows=4, shards=2, misreport=True)
    result = _shard(path, "0/2")
    assert result.returncode == 3
    failure = next(e for e in events(result.stdout) if e.get("event") == "failed")
    assert "row accounting does not add up" in failure["error"]
    assert not list((tmp_path / "store" / "r" / "echo-rows").rglob("_PART.json"))


def test_shard_argument_is_checked(tmp_path: Path) -> None:
    path = _recipe(tmp_path, rows=4, shards=2)
    assert _shard(path, "2/2").returncode == 2
    wrong_n = _shard(path, "0/3")
    assert wrong_n.returncode == 2 and "shards: 2 in the recipe" in wrong_n.stdout


def test_chunks_commit_where_the_temporary_folder_is_another_file_system(tmp_path: Path) -> None:
    """In a container /tmp is a tmpfs and the store a volume: a chunk renamed from one to the other failed
    (EXDEV). Here TMPDIR is /dev/shm (tmpfs) and the store lies on the disk of the test's folder."""
    import tempfile

    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        path = _recipe(tmp_path, rows=9, shards=1, chunk_rows=2)
        result = hala("run", str(path), env={"TMPDIR": str(shm)})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        assert manifest(tmp_path / "store", "r", "echo-rows")["outputs"]["data"]["rows"] == 9
    finally:
        import shutil

        shutil.rmtree(shm, ignore_errors=True)
