"""prepare on the real public data of ../shared/data and on malformed files written here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import fsspec
import pyarrow.parquet as pq
import pytest

from hala.contract import schema, step
from hala.contract.store import Store
from helpers import events, write_recipe
from stages.prepare.config import PrepareConfig
from stages.prepare.main import main


def run_prepare(
    tmp_path: Path,
    source: Any,
    target: Any = None,
    name: str = "prepare-x",
    store: str | None = None,
    capsys: pytest.CaptureFixture | None = None,
    **config: Any,
) -> tuple[int, dict | None, Path]:
    inputs = {"source": str(source)}
    if target is not None:
        inputs["target"] = str(target)
    recipe = write_recipe(
        tmp_path, {name: {"stage": "prepare", "inputs": inputs, "config": config}}, store=store
    )
    code = step.run("prepare", PrepareConfig, main, argv=["--recipe", str(recipe), "--step", name])
    st = Store(store or str(tmp_path / "store"))
    m = st.read_manifest("r", name)
    step_dir = tmp_path / "store" / "r" / name
    # the committed attempt's folder, which holds every output (`attempt-<id>/data`,
    # `attempt-<id>/quarantine`)
    return code, m, (step_dir / m["outputs"]["data"]["path"]).parent if m else step_dir


def rows(step_dir: Path, output: str = "data") -> list[dict]:
    return [r for f in sorted((step_dir / output).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def balanced(m: dict) -> None:
    c = m["counts"]
    assert c["rows_in"] == c["rows_out"] + c["rows_quarantined"] + sum(c["rows_removed"].values())
    assert m["outputs"]["data"]["rows"] == c["rows_out"]
    assert m["outputs"]["quarantine"]["rows"] == c["rows_quarantined"] == m["quarantine"]["rows"]


def test_schema_file_matches_the_typed_config() -> None:
    assert schema.check("prepare") is None


# --- real data --------------------------------------------------------------------------------------


def test_alpaca_5000(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "en-alpaca-5000" / "alpaca_5000.json"
    code, m, out = run_prepare(tmp_path, src, format="alpaca")
    assert code == 0
    balanced(m)
    assert m["counts"]["rows_in"] == 5000
    raw = json.loads(src.read_text())
    first = rows(out)[0]
    assert first["id"] == "x:0" and first["origin"] == "x"
    assert first["messages"][0] == {
        "role": "user",
        "content": raw[0]["instruction"] + "\n\n" + raw[0]["input"],
        "tool_calls": None,
    }
    assert first["messages"][1]["content"] == raw[0]["output"]
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert len(ds) == m["counts"]["rows_out"] and set(ds.column_names) == {
        "id",
        "origin",
        "messages",
        "tools",
    }


def test_lima_history_is_multi_turn_and_code_can_be_dropped(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "en-lima" / "lima.json"
    raw = json.loads(src.read_text())
    code, m, out = run_prepare(tmp_path / "all", src, format="alpaca")
    assert code == 0
    balanced(m)
    with_history = [i for i, r in enumerate(raw) if r["history"]]
    assert len(with_history) == 29
    got = {r["id"]: r for r in rows(out)}
    i = with_history[0]
    assert len(got[f"x:{i}"]["messages"]) == 2 * len(raw[i]["history"]) + 2
    assert m["metrics"]["multi_turn_rows"] == sum(1 for i in with_history if f"x:{i}" in got)
    fenced = sum(
        1 for r in raw if "```" in r["output"] or any("```" in t for turn in r["history"] for t in turn)
    )
    code, m2, _ = run_prepare(tmp_path / "nocode", src, format="alpaca", drop_code=True)
    assert code == 0
    balanced(m2)
    assert m2["counts"]["rows_removed"]["code"] >= fenced >= 190


def test_glaive_tool_calls(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "en-glaive-toolcall-demo" / "glaive_toolcall_en_demo.json"
    code, m, out = run_prepare(tmp_path, src, format="sharegpt")
    assert code == 0
    balanced(m)
    assert m["counts"]["rows_in"] == 300 and m["counts"]["rows_removed"]["duplicates"] == 35
    calls = 0
    for r in rows(out):
        assert isinstance(json.loads(r["tools"]), list)
        for msg in r["messages"]:
            if msg["tool_calls"]:
                assert msg["role"] == "assistant" and msg["content"] == ""
                for call in msg["tool_calls"]:
                    assert call["type"] == "function" and call["function"]["name"]
                    assert isinstance(json.loads(call["function"]["arguments"]), dict)
                    calls += 1
    assert calls > 150
    assert m["metrics"]["tool_rows"] == m["counts"]["rows_out"]
    roles = {msg["role"] for r in rows(out) for msg in r["messages"]}
    assert roles == {"user", "assistant", "tool"}


def test_gsm8k_question_answer(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "en-gsm8k" / "train.jsonl"
    code, m, out = run_prepare(tmp_path, src, format="qa", max_rows=500)
    assert code == 0
    balanced(m)
    assert m["counts"]["rows_in"] == 500
    first_raw = json.loads(src.open().readline())
    first = rows(out)[0]["messages"]
    assert first[0]["content"] == first_raw["question"] and first[1]["content"] == first_raw["answer"]


def test_ntrex_aligned_text_with_crlf(tmp_path: Path, shared_data: Path) -> None:
    d = shared_data / "ntrex128-eng-arb"
    code, m, out = run_prepare(
        tmp_path, d / "newstest2019-src.eng.txt", d / "newstest2019-ref.arb.txt", format="aligned_text"
    )
    assert code == 0
    balanced(m)
    assert m["counts"]["rows_in"] == 1997 and m["counts"]["rows_quarantined"] == 0
    got = rows(out)
    assert got[0]["src"] == "Welsh AMs worried about 'looking like muppets'"
    assert got[0]["tgt"].startswith("أعرب أعضاء جمعية ويلز الوطنية")
    assert not any("\r" in r["src"] + r["tgt"] for r in got)
    assert {(r["src_lang"], r["tgt_lang"]) for r in got} == {("en", "ar")}


def test_flores_both_directions_and_tsv_pairs(tmp_path: Path, shared_data: Path) -> None:
    d = shared_data / "flores200-sib200-subset-eng-arb" / "derived"
    en, ar = d / "flores200_subset.eng_Latn.txt", d / "flores200_subset.arb_Arab.txt"
    code, m, out = run_prepare(tmp_path / "fwd", en, ar, format="aligned_text")
    assert code == 0 and m["counts"]["rows_in"] == 1004
    balanced(m)
    code, m_rev, out_rev = run_prepare(
        tmp_path / "rev", en, ar, format="aligned_text", src_lang="ar", tgt_lang="en"
    )
    assert code == 0
    fwd, rev = rows(out), rows(out_rev)
    assert rev[0]["src"] == fwd[0]["tgt"] and rev[0]["tgt"] == fwd[0]["src"] and rev[0]["src_lang"] == "ar"
    # the real per-language TSVs are pandas-written (quoted fields): join them by index_id into one pairs
    # table
    by_id: dict[str, dict[str, str]] = {}
    for lang, folder in (("en", "eng_Latn"), ("ar", "arb_Arab")):
        with open(d.parent / folder / "dev.tsv", encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f, delimiter="\t"):
                by_id.setdefault(rec["index_id"], {})[lang] = rec["text"]
    table = tmp_path / "flores-dev.tsv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index_id", "en", "ar"])
        for k, v in sorted(by_id.items(), key=lambda kv: int(kv[0])):
            w.writerow([k, v["en"], v["ar"]])
    code, m_tsv, out_tsv = run_prepare(tmp_path / "tsv", table, format="pairs")
    assert code == 0 and m_tsv["counts"]["rows_in"] == 99
    balanced(m_tsv)
    assert all(
        r["src"] == by_id_text
        for r, by_id_text in zip(
            rows(out_tsv), [v["en"].strip() for _, v in sorted(by_id.items(), key=lambda kv: int(kv[0]))]
        )
    )
    ds = datasets.load_dataset("parquet", data_files=str(out_tsv / "data" / "*.parquet"), split="train")
    assert ds.column_names == ["id", "origin", "src_lang", "tgt_lang", "src", "tgt"]


def test_duplicates_across_batches_and_merged_runs_keep_the_first_of_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeats land in the same batch, in a later batch, and after the recent digests were merged into the
    sorted array (a buffer of 500 forces ~10 merges): exactly the first of every distinct row is kept, in
    input order."""
    from stages.prepare import dedup

    monkeypatch.setattr(dedup, "BUFFER", 500)
    rng = __import__("random").Random(7)
    order = [rng.randrange(3000) for _ in range(9000)]
    src = tmp_path / "rows.jsonl"
    src.write_text(
        "".join(json.dumps({"instruction": f"task {k}", "output": f"answer {k}"}) + "\n" for k in order)
    )
    code, m, out = run_prepare(tmp_path, src, format="alpaca")
    assert code == 0
    balanced(m)
    firsts = {}
    for i, k in enumerate(order):
        firsts.setdefault(k, i)
    kept = rows(out)
    assert [r["id"] for r in kept] == [f"x:{i}" for i in sorted(firsts.values())]
    assert m["counts"]["rows_removed"]["duplicates"] == len(order) - len(firsts)


def test_the_seen_set_holds_eight_bytes_a_row() -> None:
    from stages.prepare import dedup

    seen = dedup.SeenSet(buffer=1000)
    digests = [dedup.digest(f"row {i}".encode()) for i in range(20_000)]
    assert all(
        seen.first_seen(digests[i : i + 2048]) == [True] * len(digests[i : i + 2048])
        for i in range(0, 20_000, 2048)
    )
    assert not any(seen.first_seen(digests[::7]))
    assert len(seen) == 20_000 and seen.sorted.nbytes >= 19_000 * 8 and len(seen.recent) < 1000


def test_the_dedup_key_tells_apart_what_json_told_apart_and_nothing_more() -> None:
    """conversation_key replaced the JSON of [messages, tools] (issue 30): equal conversations share a key,
    and contents that carry the key's own separators, or split the same text differently, do not."""
    from stages.prepare.dedup import conversation_key, pair_key

    def msg(role: str, content: str, calls: list | None = None) -> dict:
        return {"role": role, "content": content, "tool_calls": calls}

    call = [{"type": "function", "function": {"name": "f", "arguments": '{"a": "1|user|2|x"}'}}]
    cases = [
        ([msg("user", "a|b"), msg("assistant", "c")], None),
        ([msg("user", "a"), msg("assistant", "b|c")], None),
        ([msg("user", "a|assistant|1|b"), msg("assistant", "")], None),
        ([msg("user", "a"), msg("assistant", "b")], None),
        ([msg("user", "a"), msg("assistant", "b")], ""),
        ([msg("user", "a"), msg("assistant", "b")], "[]"),
        ([msg("user", "a"), msg("assistant", "b", call)], None),
        ([msg("user", "a"), msg("assistant", "b|0|")], None),
        ([msg("system", "s"), msg("user", "a"), msg("assistant", "b")], None),
        ([msg("user", "sa"), msg("assistant", "b")], None),
    ]
    keys = [conversation_key(m, t) for m, t in cases]
    assert len(set(keys)) == len(cases)  # as many keys as distinct conversations
    assert keys == [conversation_key([dict(x) for x in m], t) for m, t in cases]  # equal ones agree
    assert pair_key("ab", "c") != pair_key("a", "bc") and pair_key("a", "b") == pair_key("a", "b")


# --- malformed input --------------------------------------------------------------------------------


def test_every_bad_row_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [
        json.dumps(good).encode(),
        b'{"messages": [{"role": "user", "content": "broken json"',
        (
            '{"messages": [{"role": "user", "content": "caf\u00e9"}, {"role": "assistant", "content": "ok"}]}'
        ).encode("latin-1"),
        json.dumps({"text": "no messages"}).encode(),
        json.dumps(
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}
        ).encode(),
        json.dumps(
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ).encode(),
        json.dumps(
            {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "y"}]}
        ).encode(),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"type": "function", "function": {"name": "f", "arguments": "{not json"}}
                        ],
                    },
                ]
            }
        ).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(),
        json.dumps(good).encode(),  # a duplicate
        b"",  # a blank line is not a row
    ]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    code, m, out = run_prepare(tmp_path, src, format="messages")
    assert code == 0
    balanced(m)
    assert m["counts"]["rows_in"] == 11 and m["counts"]["rows_out"] == 1
    assert m["counts"]["rows_removed"]["duplicates"] == 1
    assert m["quarantine"]["by_reason"] == {
        "invalid_json": 1,
        "invalid_utf8": 1,
        "missing_field": 1,
        "empty_turn": 1,
        "unknown_role": 1,
        "invalid_type": 1,
        "invalid_tool_call": 1,
        "not_a_record": 1,
        "missing_turn": 1,
    }
    q = rows(out, "quarantine")
    assert {r["row_index"] for r in q} == {1, 2, 3, 4, 5, 6, 7, 8, 9}
    utf8 = next(r for r in q if r["reason"] == "invalid_utf8")
    assert "line 3" in utf8["detail"] and "caf" in utf8["raw"]
    assert next(r for r in q if r["reason"] == "unknown_role")["detail"].startswith(
        "message 0: role='wizard'"
    )


def test_invalid_utf8_inside_a_json_array_quarantines_only_that_row(tmp_path: Path) -> None:
    rows_ = [
        {"instruction": "Say A.", "input": "", "output": "A"},
        {"instruction": "Say \udcff.", "input": "", "output": "B"},
    ]
    text = json.dumps(rows_, ensure_ascii=False).encode("utf-8", "surrogateescape")
    src = tmp_path / "mixed.json"
    src.write_bytes(text)
    code, m, _ = run_prepare(tmp_path, src, format="alpaca")
    assert code == 0 and m["counts"]["rows_out"] == 1 and m["quarantine"]["by_reason"] == {"invalid_utf8": 1}


def test_a_json_file_that_does_not_parse_is_exit_3_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "broken.json"
    src.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    code, m, _ = run_prepare(tmp_path, src, format="alpaca")
    assert code == 3 and m is None
    failure = next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")
    assert str(src) in failure["error"] and "line 3" in failure["error"]


def test_a_json_array_streams_row_by_row_and_a_late_error_names_its_byte(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A gzipped JSON array read 4 KiB at a time (rows cross reads; one row is larger than many reads) gives
    the rows json.load gives; the same array cut short fails at the byte where it breaks, with nothing
    committed."""
    import gzip

    from stages.prepare import readers

    alpaca = json.loads((shared_data / "en-alpaca-5000" / "alpaca_5000.json").read_text(encoding="utf-8"))[
        :400
    ]
    alpaca[7] = {**alpaca[7], "output": "long " * 20_000}  # 100 KB: 25 reads
    text = json.dumps(alpaca, ensure_ascii=False, indent=2)
    src = tmp_path / "alpaca.json.gz"
    src.write_bytes(gzip.compress(text.encode()))
    monkeypatch.setattr(readers, "READ_BYTES", 4096)
    got = list(readers.iter_json_array(gzip.open(src, "rb"), str(src)))
    assert got == alpaca
    code, m, _ = run_prepare(tmp_path / "ok", src, format="alpaca", dedup=False)
    assert code == 0 and m["counts"]["rows_in"] == 400
    cut = text.rindex('"instruction"')  # the last row breaks after its first key
    broken = tmp_path / "cut.json"
    broken.write_text(text[:cut] + '"instruction" "no colon"}]', encoding="utf-8")
    code, m, _ = run_prepare(tmp_path / "bad", broken, format="alpaca")
    assert code == 3 and m is None
    error = next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")["error"]
    assert str(broken) in error and f"byte {len(text[:cut].encode()) + 14}" in error


def test_aligned_sides_of_different_length_are_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "en.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "ar.txt").write_text("واحد\nاثنان\n")
    code, m, _ = run_prepare(tmp_path, tmp_path / "en.txt", tmp_path / "ar.txt", format="aligned_text")
    assert code == 3 and m is None
    failure = next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")
    assert "has 3 lines" in failure["error"] and "has 2" in failure["error"]


def test_pairs_tables_with_and_without_header(tmp_path: Path) -> None:
    src = tmp_path / "pairs.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["source", "target"])
        w.writerow(["Good night, friends.", "تصبحون على خير، يا أصدقاء."])
        w.writerow(["Hello.", "Hello."])  # untranslated
        w.writerow(["Yes.", ""])
        f.write("only one field\n")
    code, m, out = run_prepare(
        tmp_path / "h", src, format="pairs", columns={"src": "source", "tgt": "target"}
    )
    assert code == 0
    balanced(m)
    assert m["quarantine"]["by_reason"] == {"wrong_script": 1, "empty_text": 1, "malformed_row": 1}
    assert rows(out)[0]["src"] == "Good night, friends."
    bare = tmp_path / "bare.tsv"
    bare.write_text("مرحبا\tHello\nشكرا\tThanks\n", encoding="utf-8")
    code, m, out = run_prepare(tmp_path / "n", bare, format="pairs", header=False, input_langs=["ar", "en"])
    assert code == 0 and [(r["src"], r["tgt"]) for r in rows(out)] == [("Hello", "مرحبا"), ("Thanks", "شكرا")]


def test_config_mistakes_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "x.jsonl"
    src.write_text('{"a": "b"}\n')
    code, _, _ = run_prepare(tmp_path / "a", src, format="columns", columns={"user": "a"})
    assert code == 2
    assert "format columns needs columns.assistant" in capsys.readouterr().out
    code, _, _ = run_prepare(tmp_path / "b", src, format="alpaca", columns={"question": "a"})
    assert code == 2
    assert "columns ['question'] mean nothing for format alpaca" in capsys.readouterr().out


def test_exclude_and_first_n_rows(tmp_path: Path, repo: Path) -> None:
    code, m, out = run_prepare(
        tmp_path,
        repo / "recipes" / "samples" / "tulu3.jsonl",
        format="messages",
        exclude={"source": ["oasst", "wildchat"]},
        max_rows=4,
    )
    assert code == 0
    balanced(m)
    assert m["counts"]["rows_in"] == 4 and m["counts"]["rows_removed"]["excluded"] == 2
    tool_row = next(r for r in rows(out) if r["tools"])
    assert json.loads(tool_row["tools"])[0]["function"]["name"] == "get_weather"
    assert tool_row["messages"][1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Riyadh"}',
    }


def test_lima_style_conversation_lists(tmp_path: Path) -> None:
    src = tmp_path / "lima.jsonl"
    src.write_text(
        json.dumps({"conversations": ["Hi there", "Hello!", "How are you?", "Fine."], "source": "x"})
        + "\n"
        + json.dumps({"conversations": ["Lonely question"], "source": "x"})
        + "\n"
    )
    code, m, out = run_prepare(tmp_path, src, format="lima")
    assert code == 0 and [x["role"] for x in rows(out)[0]["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert m["quarantine"]["by_reason"] == {"missing_turn": 1}


def test_a_prepared_output_reads_back_unchanged(tmp_path: Path, repo: Path) -> None:
    """Step outputs are inputs too: the messages format reads the conversations schema losslessly."""
    src = repo / "recipes" / "samples" / "tulu3.jsonl"
    recipe = write_recipe(
        tmp_path,
        {
            "prepare-tulu3": {
                "stage": "prepare",
                "inputs": {"source": str(src)},
                "config": {"format": "messages"},
            },
            "prepare-again": {
                "stage": "prepare",
                "inputs": {"source": "prepare-tulu3"},
                "config": {"format": "messages", "origin": "tulu3"},
            },
        },
    )
    for name in ("prepare-tulu3", "prepare-again"):
        assert step.run("prepare", PrepareConfig, main, argv=["--recipe", str(recipe), "--step", name]) == 0
    first = rows(tmp_path / "store" / "r" / "prepare-tulu3")
    second = rows(tmp_path / "store" / "r" / "prepare-again")
    assert [r["messages"] for r in first] == [r["messages"] for r in second]
    assert [r["tools"] for r in first] == [r["tools"] for r in second]


def test_object_store_paths(tmp_path: Path, repo: Path) -> None:
    """memory:// stands in for s3:// or gs://: the source is a URL, the outputs are staged locally and
    uploaded."""
    fs = fsspec.filesystem("memory")
    fs.pipe("/in/lamini.jsonl", (repo / "recipes" / "samples" / "lamini.jsonl").read_bytes())
    code, m, _ = run_prepare(
        tmp_path,
        "memory://in/lamini.jsonl",
        store="memory://store",
        format="columns",
        columns={"user": "instruction", "assistant": "response"},
    )
    assert code == 0 and m["counts"]["rows_out"] == 4
    st = Store("memory://store")
    st.verify_output("r", "prepare-x", m, "data")
    with fs.open(f"/store/r/prepare-x/{m['outputs']['data']['path']}/part-00000.parquet", "rb") as f:
        assert pq.read_table(f).num_rows == 4
    assert m["inputs"]["source"]["kind"] == "url"


def test_hub_without_network_is_a_temporary_failure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # pinned to a commit: the key needs no hub, the read does, and a missing network is worth a retry
    code, m, _ = run_prepare(
        tmp_path / "pinned", f"hub:Open-Orca/OpenOrca@{'0' * 40}", format="openorca", max_rows=10
    )
    assert code == 75 and m is None
    failure = next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")
    assert "Open-Orca/OpenOrca" in failure["error"] and "retry" in failure["error"]
    # pinned by nothing: its commit cannot be read offline, and a retry would not change that (issue 18)
    code, m, _ = run_prepare(tmp_path / "unpinned", "hub:Open-Orca/OpenOrca", format="openorca", max_rows=10)
    assert code == 2 and m is None
    failure = next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")
    assert "not pinned to a revision" in failure["error"] and "hala pin" in failure["error"]


def test_stage_image_entrypoint_prints_usage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hala.ops.launch", "prepare", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--recipe" in out.stdout and "--shard" in out.stdout
