"""translate and judge through `vllm serve` (the CPU build's OpenAI server, on 127.0.0.1) against the
in-process vLLM engine on the same model: at temperature 0 the same rows, the same quarantine and the same
labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hala.contract import recipe as recipes
from hala.contract import step, tables, tiny
from hala.contract.store import Store
from hala.ops import served
from helpers import REPO, free_port, write_recipe
from stages.judge.config import JudgeConfig
from stages.judge.main import main as judge_main
from stages.translate.config import TranslateConfig
from stages.translate.main import main as translate_main

PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"
TRANSLATE = {"unit": "paragraph", "max_model_len": 512, "sampling": {"max_tokens": 96}, "chunk_rows": 2}
JUDGE = {"max_model_len": 512, "chunk_rows": 8}


def steps(data: Path, pairs: Path, engine: dict) -> dict:
    # one model for both: a server serves one, and any causal LM can be asked for a label
    return {
        "translate-x": {
            "stage": "translate",
            "inputs": {"data": str(data), "model": "tiny:translator"},
            "config": {**TRANSLATE, **engine},
        },
        "judge-x": {
            "stage": "judge",
            "inputs": {"data": str(pairs), "model": "tiny:translator"},
            "config": {**JUDGE, **engine},
        },
    }


def read(store: Path, run: str, name: str, output: str) -> dict[str, dict]:
    m = Store(str(store)).read_manifest(run, name)
    folder = store / run / name / m["outputs"][output]["path"]
    return {r["id"]: r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


@pytest.mark.slow
def test_served_by_vllm_equals_vllm_in_process(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    lines = PAIRS.read_text(encoding="utf-8").splitlines()[:24]
    pairs = tmp_path / "pairs"
    tables.write(
        str(pairs / "part-0.parquet"),
        [{"id": f"p{i}", "src": s, "tgt": t} for i, (s, t) in enumerate(x.split("\t")[:2] for x in lines)],
        tables.pairs_schema(),
    )
    # LIMA's first rows: long paragraphs, so that planning (what fits max_model_len, counted with each
    # engine's tokenizer and chat template) quarantines some as too_long the same way on both sides
    # beside the short scp116k rows the tiny translator does translate
    lima = [r for _, r in tables.RowGroups.local(str(prepared["lima"])).rows()][:8]
    scp = [r for _, r in tables.RowGroups.local(str(prepared["scp116k"])).rows()]
    data = tmp_path / "rows"
    tables.write(str(data / "part-0.parquet"), scp + lima, tables.conversations_schema())

    # the reference: both steps with vLLM in process (a subprocess: vLLM spawns its engine core)
    ref = write_recipe(
        tmp_path / "ref",
        steps(data, pairs, {"engine": "vllm"}),
        store=str(store),
        run="inproc",
        tiny_models={"pairs": str(PAIRS)},
    )
    script = (
        "import sys\nfrom hala.contract import step\n"
        "from stages.translate.config import TranslateConfig\nfrom stages.translate.main import main as t\n"
        "from stages.judge.config import JudgeConfig\nfrom stages.judge.main import main as j\n"
        f"r = {str(ref)!r}\n"
        "a = step.run('translate', TranslateConfig, t, argv=['--recipe', r, '--step', 'translate-x'])\n"
        "b = step.run('judge', JudgeConfig, j, argv=['--recipe', r, '--step', 'judge-x'])\n"
        "sys.exit(a or b)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HALA_LOG_FORMAT": "json"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # the same model folder, served
    folder = tiny.ensure(Store(str(store)), "translator", recipes.load(str(ref)))
    port = free_port()
    cmd = served.command(sys.executable, folder, name="tiny-translator", port=port, max_model_len=512)
    with served.running(cmd, port=port, log=tmp_path / "server.log", timeout=900) as url:
        endpoint = {"endpoint": {"base_url": url, "model": "tiny-translator", "max_concurrency": 8}}
        got = write_recipe(
            tmp_path / "got",
            steps(data, pairs, endpoint),
            store=str(store),
            run="served",
            tiny_models={"pairs": str(PAIRS)},
        )
        argv = ["--recipe", str(got), "--step"]
        assert step.run("translate", TranslateConfig, translate_main, argv=[*argv, "translate-x"]) == 0
        assert step.run("judge", JudgeConfig, judge_main, argv=[*argv, "judge-x"]) == 0

    m = Store(str(store)).read_manifest("served", "translate-x")
    assert m["metrics"]["engine"]["served"]["id"] == "tiny-translator"
    assert m["metrics"]["engine"]["served"]["root"] == folder  # the server's own word on what it loaded
    for output in ("conversations", "quarantine"):
        a, b = read(store, "inproc", "translate-x", output), read(store, "served", "translate-x", output)
        assert a.keys() == b.keys(), output
        for key in a:
            if output == "conversations":
                assert a[key]["messages"] == b[key]["messages"], key
            else:
                assert (a[key]["reason"], a[key]["detail"]) == (b[key]["reason"], b[key]["detail"]), key
    assert read(store, "inproc", "translate-x", "conversations"), "nothing translated: nothing compared"
    reasons = {r["reason"] for r in read(store, "inproc", "translate-x", "quarantine").values()}
    assert "too_long" in reasons, (
        reasons
    )  # planning compared too (vLLM once counted every prompt as 2 tokens)
    for output in ("accepted", "rejected"):
        assert (
            read(store, "inproc", "judge-x", output).keys() == read(store, "served", "judge-x", output).keys()
        )
    judge = Store(str(store)).read_manifest("served", "judge-x")["metrics"]["engine"]
    assert judge["choice"] == "auto" and "choice_fallback" not in judge["requests"]  # structured outputs used
