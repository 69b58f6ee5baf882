"""evaluate on the tiny stand-ins: real sacrebleu, real LightEval with its OALL v2 tasks, the real data in
../shared/data converted on the fly, checks that can fail."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from hala.contract import schema, step, tables, tiny
from hala.contract.store import Store
from helpers import REPO, output_dir, write_recipe
from stages.evaluate import localdata, translation
from stages.evaluate import main as emain
from stages.evaluate.config import EvaluateConfig

PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"
SAMPLES = REPO / "recipes" / "samples" / "oall"
PROMPT = "Translate everything that follows into Arabic:\n\n{text}"
TEACHER = "Translate from English to Arabic: {text}"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


def write_pairs(folder: Path, pairs: list[tuple[str, str]], prefix: str = "p") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"{prefix}:{i}", "origin": prefix, "src_lang": "en", "tgt_lang": "ar", "src": en, "tgt": ar}
        for i, (en, ar) in enumerate(pairs)
    ]
    tables.write(str(folder / "part-0.parquet"), rows, tables.pairs_schema())
    return folder


@pytest.fixture(scope="session")
def sample_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve of the pairs the tiny teacher learned: its translations of them are (nearly) exact."""
    return write_pairs(tmp_path_factory.mktemp("pairs") / "data", tiny.read_pairs(PAIRS)[1:13], "s")


@pytest.fixture(scope="session")
def flores_devtest(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """FLORES-200 devtest sentences (index >= 997 in SIB-200's numbering), English and Arabic aligned by
    index."""
    root = shared_data / "flores200-sib200-subset-eng-arb"
    split = {}
    with open(root / "derived" / "flores200_subset.ids.tsv", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            split[r["index_id"]] = r["flores_split"]

    def read(lang: str) -> dict[str, str]:
        out = {}
        for name in ("train", "dev", "test"):
            with open(root / lang / f"{name}.tsv", encoding="utf-8", newline="") as f:
                out.update({r["index_id"]: r["text"] for r in csv.DictReader(f, delimiter="\t")})
        return out

    en, ar = read("eng_Latn"), read("arb_Arab")
    ids = sorted((i for i in en if split[i] == "devtest"), key=int)[:24]
    assert len(ids) == 24 and all(int(i) >= 997 for i in ids)
    return write_pairs(tmp_path_factory.mktemp("flores") / "data", [(en[i], ar[i]) for i in ids], "flores")


def evaluate(
    tmp_path: Path, store: Path, run: str, inputs: dict[str, str], **config: Any
) -> tuple[int, dict | None]:
    path = write_recipe(
        tmp_path,
        {"evaluate-x": {"stage": "evaluate", "inputs": inputs, "config": config}},
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )
    code = step.run(
        "evaluate", EvaluateConfig, emain.main, argv=["--recipe", str(path), "--step", "evaluate-x"]
    )
    return code, Store(str(store)).read_manifest(run, "evaluate-x")


def test_schema_file_matches_the_typed_config() -> None:
    assert schema.check("evaluate") is None


def test_sacrebleu_scores_identical_and_shuffled_text_as_expected() -> None:
    refs = ["ذهب الطالب إلى المدرسة صباحا.", "الطقس جميل اليوم.", "أحب قراءة الكتب في المساء."]
    same = translation.score(refs, refs, "13a")
    assert same["bleu"] == 100.0 and same["chrf++"] == 100.0
    assert same["signatures"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "nw:2" in same["signatures"]["chrf++"]  # chrF++ (word n-grams), not plain chrF
    shuffled = translation.score(refs[1:] + refs[:1], refs, "intl")
    assert shuffled["bleu"] < 10 and shuffled["chrf++"] < 40


def test_translator_base_against_model_on_flores_devtest(
    tmp_path: Path, store: Path, flores_devtest: Path
) -> None:
    code, m = evaluate(
        tmp_path,
        store,
        "flores",
        {"model": "tiny:translator", "base": "tiny:lfm2-1.2b", "data": str(flores_devtest)},
        kind="translation",
        prompt=PROMPT,
        engine="transformers",
        max_model_len=512,
        max_tokens=48,
    )
    assert code == 0
    r = m["metrics"]
    assert r["rows"] == 24 and r["direction"] == "en-ar"
    for side in ("model", "base"):
        assert 0 <= r[side]["bleu"] <= 100 and 0 <= r[side]["chrf++"] <= 100
        assert r[side]["engine"]["engine"] == "transformers" and r[side]["completion_tokens"] > 0
    assert r["difference"]["chrf++"] == round(r["model"]["chrf++"] - r["base"]["chrf++"], 2)
    out = [
        r
        for _, r in tables.RowGroups.local(
            str(output_dir(store, "flores", "evaluate-x", "translations"))
        ).rows()
    ]
    assert len(out) == 24 and {"src", "ref", "hyp_model", "hyp_base"} <= set(out[0])


def test_fp8_acceptance_passes_a_faithful_model_and_fails_a_worse_one(
    tmp_path: Path, store: Path, sample_pairs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = {
        "kind": "fp8_acceptance",
        "prompt": TEACHER,
        "engine": "transformers",
        "max_model_len": 512,
        "max_tokens": 64,
    }
    code, m = evaluate(
        tmp_path / "a",
        store,
        "fp8-same",
        {"model": "tiny:teacher", "reference": "tiny:teacher", "data": str(sample_pairs)},
        **common,
        max_quality_drop=0.0,
    )
    assert code == 0
    r = m["metrics"]
    assert r["accepted"] and r["chrf_drop"] == 0.0 and r["identical_outputs"] == r["rows"] == 12
    assert r["reference"]["chrf++"] > 50  # the teacher knows these pairs
    assert r["throughput_ratio"] > 0 and r["device"]["type"] == "cpu" and r["device"]["fp8_native"] is False
    # an untrained model in the FP8 seat loses far more than the tolerance: exit 3, nothing committed
    code, m = evaluate(
        tmp_path / "b",
        store,
        "fp8-bad",
        {"model": "tiny:lfm2-350m", "reference": "tiny:teacher", "data": str(sample_pairs)},
        **common,
        max_quality_drop=0.5,
    )
    assert code == 3 and m is None
    assert "loses" in capsys.readouterr().out


def test_benchmarks_on_the_format_samples_score_every_family_for_model_and_base(
    tmp_path: Path, store: Path
) -> None:
    code, m = evaluate(
        tmp_path,
        store,
        "bench",
        {"model": "tiny:translator", "base": "tiny:lfm2-1.2b", "benchmarks": str(SAMPLES)},
        kind="benchmarks",
        trust_data_origin="format_only",
    )
    assert code == 0
    r = m["metrics"]
    fams = ["alghafa", "arabic_exams", "arabic_mmlu", "arabic_mmlu_ht", "aratrust", "madinah_qa"]
    for side in ("model", "base"):
        assert sorted(r[side]["families"]) == fams and not r[side]["failures"]
        assert all(0.0 <= v <= 1.0 for v in r[side]["tasks"].values())
        assert r[side]["average"] == round(sum(r[side]["families"].values()) / 6, 4)
    assert r["difference"]["average"] == round(r["model"]["average"] - r["base"]["average"], 4)
    assert r["data_origin"] == "format_only" and r["few_shot"] == 0 and "acc_norm" in r["metric"]
    results = output_dir(store, "bench", "evaluate-x", "results")
    assert (results / "scores.json").exists() and list(
        results.glob("lighteval-model/results/*/results_*.json")
    )


def test_benchmarks_on_real_exams_and_arabicmmlu_converted_on_the_fly(
    tmp_path: Path, store: Path, shared_data: Path
) -> None:
    data = tmp_path / "oall"
    ex = localdata.exams(str(shared_data / "ar-exams"), str(data))
    mm = localdata.arabicmmlu(
        str(shared_data / "ar-arabicmmlu-subset" / "ArabicMMLUs.csv"), str(data), per_subset=5
    )
    assert ex["test"] > 500 and ex["skipped"] == 0 and mm["subsets"] >= 10
    code, m = evaluate(
        tmp_path,
        store,
        "real",
        {"model": "tiny:lfm2-350m", "benchmarks": str(data)},
        kind="benchmarks",
        tasks=["arabic_exams", "arabic_mmlu"],
        max_samples=20,
    )
    assert code == 0
    r = m["metrics"]["model"]
    assert set(r["families"]) == {"arabic_exams", "arabic_mmlu"} and len(r["tasks"]) == 1 + mm["subsets"]
    assert not r["failures"] and 0.0 <= r["average"] <= 1.0


def test_a_broken_task_is_marked_failed_with_file_and_line_and_the_others_still_score(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data = tmp_path / "oall"
    shutil.copytree(SAMPLES, data)
    exams = data / "OALL" / "Arabic_EXAMS" / "data" / "test.jsonl"
    rows = [json.loads(x) for x in exams.read_text(encoding="utf-8").splitlines()]
    rows[1]["answer"] = None  # a question without its answer
    exams.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ht = data / "MBZUAI" / "human_translated_arabic_mmlu" / "data" / "global_facts" / "test.jsonl"
    rows = [json.loads(x) for x in ht.read_text(encoding="utf-8").splitlines()]
    rows[2]["choices"] = "الرياض"  # a malformed choice list
    ht.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code, m = evaluate(
        tmp_path / "a",
        store,
        "broken",
        {"model": "tiny:lfm2-350m", "benchmarks": str(data)},
        kind="benchmarks",
        tasks=["arabic_exams", "aratrust", "arabic_mmlu_ht"],
    )
    assert code == 0
    r = m["metrics"]["model"]
    assert list(r["tasks"]) == ["aratrust:Ethics"]
    assert f"{exams}:2: answer None is not one of A-D" in r["failures"]["arabic_exams"]
    assert f"{ht}:3: choices must be a list" in r["failures"]["arabic_mmlu_ht:global_facts"]
    # every task broken: nothing to report, exit 3 naming the file and line
    code, m = evaluate(
        tmp_path / "b",
        store,
        "broken-all",
        {"model": "tiny:lfm2-350m", "benchmarks": str(data)},
        kind="benchmarks",
        tasks=["arabic_exams"],
    )
    out = capsys.readouterr().out
    assert code == 3 and m is None and "no task could be scored" in out and "test.jsonl:2" in out


def test_missing_inputs_and_unknown_tasks_fail_clearly(
    tmp_path: Path, store: Path, sample_pairs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = evaluate(
        tmp_path / "a",
        store,
        "bad",
        {"model": "tiny:teacher", "data": str(sample_pairs)},
        kind="fp8_acceptance",
    )
    assert code == 2 and "needs input 'reference'" in capsys.readouterr().out
    code, _ = evaluate(
        tmp_path / "b",
        store,
        "bad",
        {"model": "tiny:teacher", "benchmarks": str(SAMPLES)},
        kind="benchmarks",
        tasks=["no_such_task"],
    )
    assert code == 3 and "none of the tasks no_such_task has data" in capsys.readouterr().out
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"\0")
    code, _ = evaluate(
        tmp_path / "d",
        store,
        "bad",
        {"model": str(not_a_model), "data": str(sample_pairs)},
        kind="translation",
    )
    assert code == 3 and f"{not_a_model}, which has no config.json" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _ = evaluate(
        tmp_path / "c", store, "bad", {"model": "tiny:teacher", "data": str(empty)}, kind="translation"
    )
    assert code == 3 and f"input 'data' ({empty}) holds no parquet file" in capsys.readouterr().out


def test_localdata_reports_rows_it_cannot_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "exams.jsonl"
    good = {
        "id": "1",
        "question": {"stem": "س", "choices": [{"label": k, "text": k} for k in "ABCD"]},
        "answerKey": "B",
        "info": {"subject": "Physics"},
    }
    broken = {**good, "id": "2", "question": {"stem": "س", "choices": [{"label": "A", "text": "a"}]}}
    src.write_text(json.dumps(good) + "\n" + json.dumps(broken) + "\nnot json\n", encoding="utf-8")
    counts = localdata.exams(str(src), str(tmp_path / "out"), validation=0)
    assert counts == {"test": 1, "validation": 0, "skipped": 2}
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and f"{src}:3:" in err


def test_benchmarks_through_vllm_agree_with_the_transformers_backend(tmp_path: Path, store: Path) -> None:
    """The serving engine scores the multiple-choice tasks from prompt log-probabilities; in fp32 it picks the
    same answers as LightEval's transformers backend."""
    common = {
        "kind": "benchmarks",
        "tasks": ["arabic_exams", "aratrust", "arabic_mmlu"],
        "dtype": "float32",
        "max_model_len": 512,
    }
    scores = {}
    for engine in ("transformers", "vllm"):
        code, m = evaluate(
            tmp_path / engine,
            store,
            f"bench-{engine}",
            {"model": "tiny:translator", "benchmarks": str(SAMPLES)},
            benchmark_engine=engine,
            **common,
        )
        assert code == 0, engine
        scores[engine] = m["metrics"]["model"]["tasks"]
    assert len(scores["vllm"]) == 4 and scores["vllm"] == scores["transformers"]
