"""Storage faults between s3fs and the S3 API server: throttling, 5xx, dropped connections, stalled answers,
and a step killed between its data and its manifest (tests/_lib/faultproxy.py, on 127.0.0.1 only).

What must hold: every run ends with 0 or 75 (never a traceback), no manifest points at a partial or missing
file, reruns finish the work with no row lost or written twice, and what was committed before the faults is
untouched. The figures are printed (pytest -s, and `hala test` keeps them in the suite's output)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from faultproxy import FaultProxy
from hala.contract.store import Store
from helpers import REPO, write_recipe

FIXTURES = Path(__file__).resolve().parent / "fixture_stages"
LAMINI = REPO / "recipes" / "samples" / "lamini.jsonl"
ROWS = 5_000
ECHO_ROWS = 60
# faults on about one request in eight
RATES = {"slowdown": 0.05, "internal": 0.03, "reset": 0.03, "stall": 0.01}
THROTTLED = {"slowdown": 1.0}
# the client's deliberate settings, shortened for the test: 5 attempts, answers within 1 s (a stall is 2 s)
CLIENT = json.dumps(
    {
        "config_kwargs": {
            "retries": {"mode": "standard", "total_max_attempts": 5},
            "connect_timeout": 1,
            "read_timeout": 1,
        }
    }
)


def _env(s3: dict[str, str], proxy: FaultProxy) -> dict[str, str]:
    return {
        **os.environ,
        **s3,
        "AWS_ENDPOINT_URL": proxy.url,
        "FSSPEC_S3": CLIENT,
        "HALA_STAGES_PATH": str(FIXTURES),
        "HALA_WARM": "0",
        "HALA_LEASE_TTL": "20",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")])),
    }


def _recipe(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    big, rows = folder / "big.jsonl", folder / "rows.jsonl"
    big.write_text(
        "".join(
            json.dumps({"instruction": f"Say {i}.", "response": f"{i}, said."}) + "\n" for i in range(ROWS)
        )
    )
    rows.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(ECHO_ROWS)))
    columns = {"format": "columns", "columns": {"user": "instruction", "assistant": "response"}}
    return write_recipe(
        folder,
        {
            "prepare-lamini": {"stage": "prepare", "inputs": {"source": str(LAMINI)}, "config": columns},
            "prepare-big": {"stage": "prepare", "inputs": {"source": str(big)}, "config": columns},
            "echo-rows": {
                "stage": "echo",
                "shards": 3,
                "inputs": {"data": str(rows), "after": "prepare-big"},
            },
        },
        store=url,
    )


def _hala(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hala.ops.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _committed(url: str, step: str) -> dict[str, Any]:
    """The step's manifest, every file re-hashed against it (a partial or missing file fails here)."""
    return Store(url).verify_step("r", step)


def test_transient_faults_are_retried_or_end_in_75_and_reruns_lose_no_row(
    tmp_path: Path, s3: dict[str, str], proxy: FaultProxy
) -> None:
    url = f"s3://hala-store/{tmp_path.name}"
    recipe = _recipe(tmp_path, url)
    env = _env(s3, proxy)
    first = _hala(env, "run", str(recipe), "--only", "prepare-lamini")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _committed(url, "prepare-lamini")

    codes = []
    # a run while the store throttles everything (the client's 5 attempts run out: exit 75), then runs with
    # faults on one request in eight until one finishes (a third was tried: every fault costs a backoff, ~100
    # s per run)
    for rates in [THROTTLED] + [RATES] * 6:
        proxy.set_rates(rates)
        out = _hala(env, "run", str(recipe))
        codes.append(out.returncode)
        assert out.returncode in (0, 75), f"exit {out.returncode}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        if out.returncode == 0 and rates is RATES:
            break
    faults, requests = proxy.faults(), proxy.counts["requests"]
    proxy.set_rates({})
    assert codes[0] == 75 and codes[-1] == 0, f"no clean run in {len(codes)} tries: {codes}"

    after = _committed(url, "prepare-lamini")
    assert after == before, "a step committed before the faults was touched"
    big = _committed(url, "prepare-big")
    assert big["counts"]["rows_in"] == ROWS and big["outputs"]["data"]["rows"] == ROWS
    echo = _committed(url, "echo-rows")
    fs = Store(url).fs
    got = sorted(
        json.loads(line)["n"]
        for f in echo["outputs"]["data"]["files"]
        for line in fs.cat_file(Store(url).path("r", "echo-rows", f["path"])).decode().splitlines()
    )
    assert got == list(range(ECHO_ROWS)), "a row was lost or written twice"
    print(
        f"\n[faults] {requests} requests through the proxy, faults injected {faults} "
        f"({sum(faults.values())} in all, "
        f"each one a retry of the client or an exit 75); runs until one finished: exit codes {codes}; rows "
        "lost 0, "
        f"rows twice 0; the step committed before the faults: untouched"
    )
    assert sum(faults.values()) > 0


def test_a_kill_between_the_data_and_the_manifest_commits_nothing_and_the_rerun_commits_every_row(
    tmp_path: Path, s3: dict[str, str], proxy: FaultProxy
) -> None:
    url = f"s3://hala-store/{tmp_path.name}"
    recipe = _recipe(tmp_path, url)
    env = _env(s3, proxy)
    py = REPO / ".venvs" / "data" / "bin" / "python"
    cmd = [str(py), "-m", "stages.prepare", "--recipe", str(recipe), "--step", "prepare-big"]
    proxy.hold(r"^PUT .*/prepare-big/_MANIFEST\.json")
    writer = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proxy.held.wait(timeout=300), "the writer never reached its manifest"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        proxy.release_held(forward=False)
    store = Store(url)
    step = store.path("r", "prepare-big")
    assert not store.fs.exists(store.path("r", "prepare-big", "_MANIFEST.json"))
    uploaded = [p for p in store.fs.find(step) if "/attempt-" in p]
    assert uploaded, "the killed writer had uploaded its data files"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    big = _committed(url, "prepare-big")
    assert big["counts"]["rows_in"] == ROWS and big["outputs"]["data"]["rows"] == ROWS
    listed = {
        store.path("r", "prepare-big", f["path"]) for out in big["outputs"].values() for f in out["files"]
    }
    assert not listed & set(uploaded), "the rerun's commit references a file of the killed attempt"
    ours = store.path("r", "prepare-big", f"attempt-{big['attempt']}")
    store.fs.invalidate_cache()
    assert set(store.fs.find(ours)) == listed, (
        "files other than the committed ones in the committed attempt's folder"
    )
    # the killed attempt's files are garbage: `hala gc` lists exactly them, removes them, and the commit still
    # verifies
    listing = _hala(env, "gc", "r", "--store", url, "--grace", "0", "--json")
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert {f["path"] for f in json.loads(listing.stdout)["files"]} == {f"s3://{p}" for p in uploaded}
    assert _hala(env, "gc", "r", "--store", url, "--grace", "0", "--delete").returncode == 0
    store.fs.invalidate_cache()
    assert not [p for p in store.fs.find(step) if "/attempt-" in p and p not in listed]
    assert _hala(env, "verify", "r", "--store", url).returncode == 0
    uploaded = len(uploaded)
    print(
        f"\n[kill before the manifest] {uploaded} data files were uploaded when the writer was killed, no "
        "manifest; "
        f"the rerun committed all {ROWS} rows in {len(listed)} files"
    )


def test_refused_credentials_are_a_config_error_naming_the_url_and_the_fix(
    tmp_path: Path, s3: dict[str, str], proxy: FaultProxy
) -> None:
    """What S3 answers to an unknown access key (403 InvalidAccessKeyId), on every request: exit 2 before any
    work, naming the store and the variables to set; nothing retried for minutes."""
    url = f"s3://hala-store/{tmp_path.name}"
    recipe = _recipe(tmp_path, url)
    proxy.set_rates({"deny": 1.0})
    out = _hala(_env(s3, proxy), "run", str(recipe), "--only", "prepare-lamini")
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        f"store {url}" in out.stderr
        and "credentials were refused" in out.stderr
        and "AWS_ACCESS_KEY_ID" in out.stderr
    )
    assert proxy.counts["requests"] <= 5, "a refusal is not worth a retry"
