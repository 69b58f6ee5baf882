"""judge on the tiny Qwen2 stand-in: verdicts read from the labels' scores, accounting, bad rows, vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from hala.contract import step, tables
from hala.contract.store import Store
from helpers import REPO, output_dir, write_recipe
from stages.judge.config import JudgeConfig
from stages.judge.main import main as judge_main

PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def opus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OPUS sample as prepare writes it, plus rows prepare would have stopped (the judge checks too)."""
    rows = []
    for line in (REPO / "recipes" / "samples" / "opus100.jsonl").read_text(encoding="utf-8").splitlines():
        t = json.loads(line)["translation"]
        rows.append(
            {
                "id": f"opus:{len(rows)}",
                "origin": "opus",
                "src_lang": "en",
                "tgt_lang": "ar",
                "src": t["en"],
                "tgt": t["ar"],
            }
        )
    folder = tmp_path_factory.mktemp("opus") / "data"
    tables.write(str(folder / "part-0.parquet"), rows, tables.pairs_schema())
    return folder


def judge(tmp_path: Path, store: Path, data: Path, run: str, **config: Any) -> tuple[int, dict | None]:
    recipe = write_recipe(
        tmp_path,
        {
            "judge-x": {
                "stage": "judge",
                "inputs": {"data": str(data), "model": "tiny:judge"},
                "config": {"engine": "transformers", **config},
            }
        },
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )
    code = step.run("judge", JudgeConfig, judge_main, argv=["--recipe", str(recipe), "--step", "judge-x"])
    return code, Store(str(store)).read_manifest(run, "judge-x")


def _rows(store: Path, run: str, output: str) -> list[dict]:
    return [
        r
        for f in sorted(output_dir(store, run, "judge-x", output).glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]


def test_misaligned_pairs_are_rejected_and_every_row_is_accounted_for(
    tmp_path: Path, store: Path, opus: Path
) -> None:
    code, m = judge(tmp_path, store, opus, "tf", chunk_rows=5)
    assert code == 0
    c = m["counts"]
    assert (
        c["rows_in"] == 14
        and c["rows_in"] == c["rows_out"] + c["rows_quarantined"] + c["rows_removed"]["rejected"]
    )
    assert m["quarantine"]["by_reason"] == {"empty_text": 1}  # "Yes." with an empty Arabic side
    rejected = {r["src"]: r for r in _rows(store, "tf", "rejected")}
    assert "The door is open." in rejected and rejected["The door is open."]["verdict"] == "REJECT"
    scores = json.loads(rejected["The door is open."]["scores"])
    assert scores["REJECT"] > scores["ACCEPT"]
    accepted = {r["src"] for r in _rows(store, "tf", "accepted")}
    assert {"Good morning.", "Thank you very much.", "Where is the station?"} <= accepted
    assert m["metrics"]["acceptance_rate"] == round(len(_rows(store, "tf", "accepted")) / (14 - 1), 4)
    assert m["metrics"]["engine"]["engine"] == "transformers"


def test_config_needs_both_sides_in_the_prompt(tmp_path: Path, store: Path, opus: Path) -> None:
    code, _ = judge(tmp_path, store, opus, "cfg", prompt="Is {src} fine?")
    assert code == 2


@pytest.mark.slow
def test_vllm_guided_decoding_gives_the_same_verdicts(tmp_path: Path, store: Path, opus: Path) -> None:
    """On vLLM's CPU build the verdict comes from guided decoding to the two labels; it must agree with the
    transformers engine's log-probability comparison on the pairs the stand-in knows."""
    judge(tmp_path / "ref", store, opus, "ref")
    recipe = write_recipe(
        tmp_path,
        {
            "judge-x": {
                "stage": "judge",
                "inputs": {"data": str(opus), "model": "tiny:judge"},
                "config": {"engine": "vllm", "max_model_len": 512, "chunk_rows": 3},
            }
        },
        store=str(store),
        run="vllm",
        tiny_models={"pairs": str(PAIRS)},
    )
    out = subprocess.run(
        [sys.executable, "-m", "stages.judge", "--recipe", str(recipe), "--step", "judge-x"],
        capture_output=True,
        text=True,
        env={**os.environ, "HALA_LOG_FORMAT": "json"},
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = Store(str(store)).read_manifest("vllm", "judge-x")
    assert m["metrics"]["engine"]["engine"] == "vllm"
    # several chunks share the engine's queue (hala.kit.engine streams): each verdict must land on its own
    # pair
    assert len([line for line in out.stdout.splitlines() if '"event": "chunk committed"' in line]) >= 3
    ref = {r["src"] for r in _rows(store, "ref", "accepted")}
    got = {r["src"] for r in _rows(store, "vllm", "accepted")}
    assert got == ref
