"""The store on a real S3 API: moto's server mode on 127.0.0.1 (conftest.py starts it, and stops it after), so
that s3fs, aiobotocore and botocore run their real code over HTTP: multipart uploads, ETags, listings,
errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hala.contract.errors import ConfigError, TemporaryError
from hala.contract.store import Store
from helpers import REPO, events, free_port, hala, write_recipe

FIXTURES = Path(__file__).resolve().parent / "fixture_stages"
LAMINI = REPO / "recipes" / "samples" / "lamini.jsonl"


def _recipe(folder: Path, store: str) -> Path:
    rows = folder / "rows.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    rows.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(10)))
    return write_recipe(
        folder,
        {
            "prepare-lamini": {
                "stage": "prepare",
                "inputs": {"source": str(LAMINI)},
                "config": {"format": "columns", "columns": {"user": "instruction", "assistant": "response"}},
            },
            "echo-rows": {
                "stage": "echo",
                "shards": 3,
                "inputs": {"data": str(rows), "after": "prepare-lamini"},
                "config": {"quarantine_every": 3, "chunk_rows": 1},
            },
        },
        store=store,
    )


def _status(recipe_store: str, env: dict[str, str]) -> dict[str, tuple]:
    out = hala("status", "r", "--store", recipe_store, "--json", env=env)
    assert out.returncode == 0, out.stderr
    return {r["step"]: (r["state"], r["rows"], r["counts"]) for r in json.loads(out.stdout)}


def test_a_run_on_s3_commits_what_a_local_run_commits(s3: dict[str, str], tmp_path: Path) -> None:
    env = {
        **s3,
        "HALA_STAGES_PATH": str(FIXTURES),
        "HALA_WARM": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")])),
    }
    local = _recipe(tmp_path / "local", str(tmp_path / "local" / "store"))
    remote_url = "s3://hala-store/runs"
    remote = _recipe(tmp_path / "remote", remote_url)
    assert hala("run", str(local), env=env).returncode == 0
    first = hala("run", str(remote), env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    assert _status(remote_url, env) == _status(str(tmp_path / "local" / "store"), env)
    assert {s for s, *_ in _status(remote_url, env).values()} == {"committed"}
    verify = hala("verify", "r", "--store", remote_url, env=env)
    # every file's sha256 read back from the server
    assert verify.returncode == 0, verify.stdout + verify.stderr
    seconds = {}
    for where, recipe in (("local", local), ("s3", remote)):
        t0 = time.monotonic()
        again = hala("run", str(recipe), env=env)
        seconds[where] = time.monotonic() - t0
        assert again.returncode == 0
        assert {e["state"] for e in events(again.stdout) if e.get("event") == "summary"} == {"cached"}
    print(
        f"\n[s3] cached rerun: local store {seconds['local']:.2f} s, s3 (moto on 127.0.0.1) "
        f"{seconds['s3']:.2f} s"
    )


def test_a_missing_bucket_is_a_config_error_naming_the_url(s3: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        Store("s3://no-such-bucket/x").check()
    recipe = _recipe(tmp_path, "s3://no-such-bucket/x")
    out = hala("run", str(recipe), "--only", "prepare-lamini", env={**s3, "HALA_STAGES_PATH": str(FIXTURES)})
    assert out.returncode == 2 and "bucket 'no-such-bucket' does not exist" in out.stderr


def test_a_store_that_does_not_answer_is_temporary(s3: dict[str, str], tmp_path: Path, monkeypatch) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", down)
    with pytest.raises(TemporaryError, match="did not answer after the client's retries"):
        Store("s3://hala-store/x").check()
    recipe = _recipe(tmp_path, "s3://hala-store/x")
    out = hala(
        "run",
        str(recipe),
        "--only",
        "prepare-lamini",
        env={**s3, "AWS_ENDPOINT_URL": down, "HALA_STAGES_PATH": str(FIXTURES)},
    )
    assert out.returncode == 75, out.stderr


def test_a_store_whose_client_is_not_installed_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"store 'abfs://container/x': Install adlfs .*install the fsspec package"
    ):
        Store("abfs://container/x")
