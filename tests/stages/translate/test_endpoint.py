"""translate and judge against a served model (the endpoint engine) that misbehaves: 429s, 5xx, resets, cut
and broken answers, slow answers, refused requests, a kill mid-run. Every row ends exactly once, in the
outputs or the quarantine with its reason; the key never reaches a file or a log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from hala.contract import recipe as recipe_mod
from hala.contract import sources, step, tables
from hala.contract.store import Store
from helpers import REPO, events, free_port, hala, write_recipe
from openaiserver import ModelServer
from stages.judge.config import JudgeConfig
from stages.judge.main import main as judge_main
from stages.translate.config import TranslateConfig
from stages.translate.main import main as translate_main

PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"
FAULTS = {
    "429": 0.04,
    "500": 0.04,
    "slow": 0.02,
    "truncated": 0.03,
    "not_json": 0.04,
    "no_choice": 0.02,
    "reset": 0.03,
}
FAST_RETRIES = {"retries": 4, "backoff": 0.05, "max_backoff": 0.5, "bad_response_retries": 1}


def many_rows(prepared: dict[str, Path], folder: Path, copies: int) -> tuple[Path, set[str]]:
    source = [r for _, r in tables.RowGroups.local(str(prepared["tulu3"])).rows()]
    rows = [{**r, "id": f"{r['id']}-{k}"} for k in range(copies) for r in source]
    tables.write(str(folder / "part-0.parquet"), rows, tables.conversations_schema())
    return folder, {r["id"] for r in rows}


def recipe_for(
    folder: Path, store: Path, run: str, stage: str, data: Path, config: dict[str, Any], model: str
) -> Path:
    return write_recipe(
        folder,
        {f"{stage}-x": {"stage": stage, "inputs": {"data": str(data), "model": model}, "config": config}},
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )


def run_translate(recipe: Path) -> int:
    return step.run(
        "translate", TranslateConfig, translate_main, argv=["--recipe", str(recipe), "--step", "translate-x"]
    )


def output_ids(store: Path, run: str, name: str, outputs: tuple[str, ...]) -> dict[str, list[dict]]:
    m = Store(str(store)).read_manifest(run, name)
    got = {}
    for output in outputs:
        folder = store / run / name / m["outputs"][output]["path"]
        got[output] = [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return got


def test_a_translate_step_against_a_misbehaving_server_ends_with_every_row_exactly_once(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """Faults at random on a fifth of the requests, retries kept short so that some chunks fail past them
    (exit 75): rerun until the step commits. Each row is in the conversations or the quarantine, once; a
    refused request and an answer still broken after its retries are quarantined with their reasons; the
    counts add up; the engine's manifest counts the retries by cause and the server's model."""
    data, ids = many_rows(prepared, tmp_path / "data", 12)  # 48 rows
    refused = next(r for _, r in tables.RowGroups.local(str(data)).rows())["messages"][0]["content"][:40]
    config = {
        "unit": "paragraph",
        "chunk_rows": 8,
        "endpoint": {"base_url": "", "model": "tiny-translator", "max_concurrency": 8, **FAST_RETRIES},
    }
    codes = []
    with ModelServer(
        model="tiny-translator", faults=FAULTS, seed=7, slow_seconds=0.5, fail_texts=(refused,)
    ) as s:
        config["endpoint"]["base_url"] = f"{s.url}/v1"
        recipe = recipe_for(tmp_path, store, "faulty", "translate", data, config, "tiny:translator")
        for _ in range(12):
            codes.append(run_translate(recipe))
            if codes[-1] == 0:
                break
        served = dict(s.log)
    assert codes[-1] == 0 and set(codes) <= {0, 75}, codes
    assert served["429"] and served["reset"] and served["not_json"] and served["truncated"], served
    got = output_ids(store, "faulty", "translate-x", ("conversations", "quarantine"))
    seen = [r["id"] for r in got["conversations"]] + [r["id"] for r in got["quarantine"]]
    assert sorted(seen) == sorted(ids)  # every row once: none lost, none twice
    reasons = {r["reason"] for r in got["quarantine"]}
    assert "endpoint_rejected" in reasons, reasons
    m = Store(str(store)).read_manifest("faulty", "translate-x")
    c = m["counts"]
    assert c["rows_in"] == 48 == c["rows_out"] + c["rows_quarantined"]
    engine = m["metrics"]["engine"]
    assert engine["engine"] == "endpoint" and engine["served"]["id"] == "tiny-translator"
    assert engine["latency_seconds"]["p50"] is not None
    for row in got["conversations"]:  # the stand-in's answers, put back in place
        assert any("\u0600" <= ch <= "\u06ff" for m_ in row["messages"] for ch in m_["content"])


def test_an_answer_broken_past_its_retries_is_quarantined_as_bad_response(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """A server whose every 200 is cut JSON: no crash, no silent drop, every row quarantined as
    bad_response, exit 0."""
    data, ids = many_rows(prepared, tmp_path / "data", 2)
    config = {
        "unit": "turn",
        "endpoint": {"base_url": "", "model": "m", **FAST_RETRIES},
    }
    with ModelServer(model="m", faults={"not_json": 1.0}) as s:
        config["endpoint"]["base_url"] = f"{s.url}/v1"
        code = run_translate(
            recipe_for(tmp_path, store, "broken", "translate", data, config, "tiny:translator")
        )
    assert code == 0
    got = output_ids(store, "broken", "translate-x", ("conversations", "quarantine"))
    assert not got["conversations"]
    assert sorted(r["id"] for r in got["quarantine"]) == sorted(ids)
    assert {r["reason"] for r in got["quarantine"]} == {"bad_response"}


def test_the_key_is_sent_and_never_written(
    tmp_path: Path, store: Path, prepared: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    """The key travels in the variable api_key_env names and in the Authorization header; not in the
    store's files (manifests, markers, logs) nor in the step's output. A wrong key or an unset variable is
    a configuration error (exit 2) that names the variable, not the key."""
    secret = "sk-hala-test-7f3a9c1e5b"
    data, _ = many_rows(prepared, tmp_path / "data", 1)
    config = {"unit": "turn", "endpoint": {"base_url": "", "model": "m", "api_key_env": "HALA_TEST_KEY"}}
    with ModelServer(model="m", key=secret) as s:
        config["endpoint"]["base_url"] = f"{s.url}/v1"
        recipe = recipe_for(tmp_path, store, "keyed", "translate", data, config, "tiny:translator")
        os.environ.pop("HALA_TEST_KEY", None)
        assert run_translate(recipe) == 2
        assert "HALA_TEST_KEY" in capfd.readouterr().out
        os.environ["HALA_TEST_KEY"] = "sk-wrong"
        try:
            assert run_translate(recipe) == 2
            os.environ["HALA_TEST_KEY"] = secret
            assert run_translate(recipe) == 0
        finally:
            os.environ.pop("HALA_TEST_KEY", None)
        assert f"Bearer {secret}" in s.auth_seen
    out = capfd.readouterr()
    assert secret not in out.out and secret not in out.err
    for path in (store / "keyed").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_how_a_step_reaches_its_endpoint_is_not_part_of_its_cache_key(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """Concurrency, timeouts, retries and the key's variable change how requests are sent, not what comes
    back: a committed step stays committed when they change; the model it asks is part of the key."""
    from hala.contract.recipe import ENDPOINT_OPERATIONAL
    from hala.kit.endpoint import Endpoint

    # every field of the endpoint is either how it is reached or what is asked: none left unclassified
    assert set(ENDPOINT_OPERATIONAL) | {"base_url", "served", "model", "choice"} == set(Endpoint.model_fields)
    data, _ = many_rows(prepared, tmp_path / "data", 1)
    with ModelServer(model="m") as s:
        base = {"base_url": f"{s.url}/v1", "model": "m"}
        recipe = recipe_for(tmp_path, store, "ops", "translate", data, {"endpoint": base}, "tiny:translator")
        assert run_translate(recipe) == 0
        first = Store(str(store)).read_manifest("ops", "translate-x")
        changed = {**base, "max_concurrency": 3, "read_timeout": 30, "retries": 9, "backoff": 0.1}
        recipe = recipe_for(
            tmp_path, store, "ops", "translate", data, {"endpoint": changed}, "tiny:translator"
        )
        assert run_translate(recipe) == 0
        assert Store(str(store)).read_manifest("ops", "translate-x")["attempt"] == first["attempt"]  # cached
    other = recipe_for(
        tmp_path, store, "ops", "translate", data, {"endpoint": {**base, "model": "m2"}}, "tiny:translator"
    )
    loaded = recipe_mod.load(other)
    step_x = loaded.steps["translate-x"]
    resolved = {
        n: sources.input_key(Store(str(store)), loaded, step_x, ref) for n, ref in step_x.inputs.items()
    }
    assert sources.fingerprint(step_x, resolved) != first["fingerprint"]  # another model asked: another key


def test_judge_through_an_endpoint_with_and_without_structured_outputs(tmp_path: Path, store: Path) -> None:
    """Structured outputs where the server has them; a server that ignores them is noticed on its first
    answer and asked for log-probabilities: the same pairs judged, scores recorded, the mode in the
    manifest."""
    pairs = [
        {"id": f"p{i}", "src": f"The cat number {i} sleeps.", "tgt": f"القطة رقم {i} تنام."}
        for i in range(30)
    ]
    data = tmp_path / "pairs"
    tables.write(str(data / "part-0.parquet"), pairs, tables.pairs_schema())
    from transformers import AutoTokenizer

    for structured in (True, False):
        run = f"judge-{structured}"
        config = {
            "chunk_rows": 7,
            "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "judge", **FAST_RETRIES},
        }
        recipe = recipe_for(tmp_path / run, store, run, "judge", data, config, "tiny:judge")
        # the labels' first tokens as this tokenizer spells them: what a server's top_logprobs would show
        ctx_model = _tiny_folder(store, recipe, "tiny:judge")
        tok = AutoTokenizer.from_pretrained(ctx_model)
        firsts = tuple(tok.decode(tok.encode(x, add_special_tokens=False)[:1]) for x in ("ACCEPT", "REJECT"))
        with ModelServer(model="judge", structured=structured, label_tokens=firsts) as s:
            config["endpoint"]["base_url"] = f"{s.url}/v1"
            recipe = recipe_for(tmp_path / run, store, run, "judge", data, config, "tiny:judge")
            assert (
                step.run(
                    "judge", JudgeConfig, judge_main, argv=["--recipe", str(recipe), "--step", "judge-x"]
                )
                == 0
            )
        m = Store(str(store)).read_manifest(run, "judge-x")
        got = output_ids(store, run, "judge-x", ("accepted", "rejected", "quarantine"))
        assert sorted(r["id"] for o in got.values() for r in o) == sorted(p["id"] for p in pairs)
        assert got["accepted"] and got["rejected"] and not got["quarantine"]
        assert m["metrics"]["engine"]["choice"] == ("auto" if structured else "logprobs")
        if not structured:
            assert all(json.loads(r["scores"]) for r in got["rejected"])


def _tiny_folder(store: Path, recipe: Path, uri: str) -> str:
    from hala.contract import recipe as recipes
    from hala.contract import tiny

    return tiny.ensure(Store(str(store)), uri.split(":", 1)[1], recipes.load(str(recipe)))


def test_a_killed_translate_step_talking_to_a_server_resumes_without_loss_or_duplicates(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """SIGKILL while requests are in flight (slow answers keep them there), then a rerun: every row once."""
    data, ids = many_rows(prepared, tmp_path / "data", 10)  # 40 rows
    config = {
        "unit": "paragraph",
        "chunk_rows": 4,
        "endpoint": {"base_url": "", "model": "m", "max_concurrency": 4, **FAST_RETRIES},
    }
    with ModelServer(model="m", faults={"slow": 0.3}, slow_seconds=0.3) as s:
        config["endpoint"]["base_url"] = f"{s.url}/v1"
        recipe = recipe_for(tmp_path, store, "killed", "translate", data, config, "tiny:translator")
        cmd = [sys.executable, "-m", "stages.translate", "--recipe", str(recipe), "--step", "translate-x"]
        env = {**os.environ, "HALA_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if sum('"event": "chunk committed"' in x for x in lines) == 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    resumed = [e for e in events(again.stdout) if e.get("event") == "chunk already committed"]
    assert len(resumed) >= 3
    got = output_ids(store, "killed", "translate-x", ("conversations", "quarantine"))
    seen = [r["id"] for o in got.values() for r in o]
    assert sorted(seen) == sorted(ids)


def test_the_local_runner_serves_a_model_once_for_the_steps_that_use_it(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """A recipe's served model (here the stand-in through `command`, as SGLang or TGI would be): started once
    when the first step that uses it starts, on a free port of 127.0.0.1 (the recipe's port, the one compose
    and the cluster use, is taken here by another listener), its URL given to both steps, stopped after the
    last one, its log kept in the store; the rerun is cached and starts no server."""
    import socket

    data, ids = many_rows(prepared, tmp_path / "data", 2)
    port = free_port()
    use = {"endpoint": {"served": "standin", **FAST_RETRIES}}
    recipe = write_recipe(
        tmp_path,
        {
            "translate-a": {"stage": "translate", "inputs": {"data": str(data)}, "config": use},
            "translate-b": {
                "stage": "translate",
                "inputs": {"data": str(data)},
                "config": {**use, "unit": "paragraph"},
            },
        },
        store=str(store),
        run="served-run",
        tiny_models={"pairs": str(PAIRS)},
        served={
            "standin": {
                "model": "tiny:translator",
                "port": port,
                "ready_seconds": 300,
                "command": [
                    "{python}",
                    str(REPO / "tests" / "_lib" / "openaiserver.py"),
                    "--port",
                    "{port}",
                    "--model",
                    "{name}",
                ],
            }
        },
    )
    with socket.socket() as busy:  # a laptop's own server on the recipe's port
        busy.bind(("127.0.0.1", port))
        busy.listen()
        out = hala("run", str(recipe), env={"HALA_LOG_FORMAT": "json"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    evs = events(out.stdout + out.stderr)
    assert [e["served"] for e in evs if e.get("event") == "served"] == ["standin"]
    url = next(e["url"] for e in evs if e.get("event") == "served")
    assert url.startswith("http://127.0.0.1:") and not url.startswith(f"http://127.0.0.1:{port}/")
    assert [e["served"] for e in evs if e.get("event") == "served stopped"] == ["standin"]
    for name in ("translate-a", "translate-b"):
        m = Store(str(store)).read_manifest("served-run", name)
        assert m["metrics"]["engine"]["served"]["id"] == "standin"
        assert m["counts"]["rows_in"] == len(ids)
    with socket.socket() as s:  # stopped: nothing listens any more
        assert s.connect_ex(("127.0.0.1", int(url.split(":")[2].split("/")[0]))) != 0
    assert (store / "served-run" / "_logs" / "served-standin.log").is_file()
    again = hala("run", str(recipe), env={"HALA_LOG_FORMAT": "json"})
    assert again.returncode == 0
    assert not [e for e in events(again.stdout + again.stderr) if e.get("event") == "served"]
