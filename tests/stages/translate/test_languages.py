"""Languages as data (hala.kit.languages) and the language-identification check of the gate
(hala.kit.langid): a model that answers in Persian or Urdu writes the Arabic script, passes every script
check, and is caught only by identification."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hala.contract import step, tables
from hala.contract.errors import ConfigError
from hala.contract.store import Store
from hala.kit import langid, languages
from helpers import REPO, write_recipe
from openaiserver import ModelServer
from stages.translate.config import TranslateConfig
from stages.translate.main import main as translate_main

LANG = REPO / "tests" / "data" / "lang"
PAPER = REPO / "recipes" / "hala-paper.yaml"
SWITCH_HI = REPO / "recipes" / "switches" / "target-hi.yaml"


def run_translate(recipe: Path) -> int:
    return step.run(
        "translate", TranslateConfig, translate_main, argv=["--recipe", str(recipe), "--step", "translate-x"]
    )


def output_rows(store: Path, run: str, name: str, output: str) -> list[dict]:
    m = Store(str(store)).read_manifest(run, name)
    folder = store / run / name / m["outputs"][output]["path"]
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"


def test_scripts_are_read_from_unicode_and_languages_that_share_one_are_not_told_apart_by_it() -> None:
    arabic = languages.script_run(("Arabic",))
    # the letters, the harakat, the Arabic comma and question mark, tatweel, both sets of Arabic-Indic digits
    for ch in "بـ،؟ًٌ٣۳ﻻ":
        assert arabic.fullmatch(ch), hex(ord(ch))
    latin = languages.script_run(("Latin",))
    assert latin.fullmatch("ñßÆŒẞ") and not latin.fullmatch("×")  # × is Common, not a letter of any script
    assert languages.script_run(("Devanagari",)).fullmatch("हिन्दी")  # the vowel signs are Devanagari's
    assert languages.script_share("الطقس جميل today", "ar", "en") == pytest.approx(9 / 14)
    assert languages.script_share("امروز هوا خوب است", "fa", "ar") is None  # one script: only identification
    assert languages.script_share("123 !?", "ar", "en") is None
    import re

    assert re.fullmatch(languages.word("fa"), "می\u200cخواهیم")  # ZWNJ inside one Persian word
    assert not re.fullmatch(languages.word("ar"), "می\u200cخواهیم")
    assert re.fullmatch(languages.word("en"), "don't") and not re.fullmatch(languages.word("en"), "'don")
    with pytest.raises(ConfigError, match="target: unknown language 'xx'; known: ar, bn"):
        languages.get("xx", "target")


def test_a_direction_is_source_and_target_codes_and_the_old_spelling_is_the_same_step() -> None:
    old = TranslateConfig.model_validate({"direction": "ar-en"})
    new = TranslateConfig.model_validate({"source": "ar", "target": "en"})
    assert old.languages == new.languages == ("ar", "en")
    assert old.model_dump() == new.model_dump()  # one cache key for both spellings
    assert TranslateConfig.model_validate({}).languages == ("en", "ar")
    assert TranslateConfig.model_validate({"target": "fa"}).request("Hi") == (
        "Translate everything that follows into Persian:\n\nHi"
    )
    for bad, says in (
        ({"direction": "english-arabic"}, "unknown language 'english'"),
        ({"direction": "en"}, "write SOURCE-TARGET"),
        ({"source": "ar", "target": "ar"}, "source and target are both 'ar'"),
        ({"prompt": "Into {lang}: {text}"}, "only {text}, {source} and {target} are filled in"),
    ):
        with pytest.raises(ValueError, match=says):
            TranslateConfig.model_validate(bad)


def test_the_identifier_tells_arabic_persian_and_urdu_apart() -> None:
    for code in ("fa", "ur"):
        lines = (LANG / f"{code}.txt").read_text(encoding="utf-8").splitlines()
        found = [langid.identify(line) for line in lines]
        assert all(c == code and score > 0.9 for c, score in found), [f for f in found if f[0] != code]
    assert langid.identify("الطقس جميل اليوم ونريد أن نذهب إلى الحديقة.")[0] == "ar"
    assert langid.identify("عايز أروح البيت دلوقتي يا صاحبي")[0] == "ar"  # Egyptian counts as Arabic


def test_the_identifier_scores_as_py3langid_and_reads_a_long_turn_by_its_head_and_tail() -> None:
    """hala.kit.langid scores py3langid's features itself (bench/langid.py --speed: twice as fast): the same
    language and probability as the library's own ranking, dialects folded, on every test sentence; a turn
    over MAX_CHARS is identified by its first and last MAX_CHARS/2 characters."""
    lid = langid._model()["lid"]
    texts = [line for code in ("fa", "ur") for line in (LANG / f"{code}.txt").read_text("utf-8").splitlines()]
    texts += [
        line for row in (LANG / "en-hi.tsv").read_text("utf-8").splitlines() for line in row.split("\t")
    ]
    texts += ["عايز أروح البيت دلوقتي يا صاحبي", "THE WEATHER IS NICE TODAY"]  # a dialect; all capitals
    for text in texts:
        folded: dict[str, float] = {}
        for code, prob in lid.rank(text):
            folded[langid.MACRO.get(code, code)] = folded.get(langid.MACRO.get(code, code), 0.0) + prob
        best = max(folded, key=folded.__getitem__)
        found, score = langid.identify(text)
        assert found == best and score == pytest.approx(folded[best], abs=1e-4), (text, found, best)
    assert langid.identify("") == ("und", 0.0)  # no feature at all
    long = "a" * 400 + "b" * 2000 + "c" * 400
    assert langid.sample(long) == "a" * 400 + "b" * 100 + "\n" + "b" * 100 + "c" * 400
    assert langid.sample("short") == "short"


def test_a_source_row_in_another_language_is_quarantined_before_the_model(
    tmp_path: Path, store: Path
) -> None:
    """check_source_language: a row whose turns together are identified as another language than the source
    (French, in the Latin script English is written in: no script check sees it) is quarantined as
    wrong_language before any request; the English rows are translated."""
    turns = {
        "r0": ["Can you tell me how to cook rice?", "Rinse the rice, then simmer it in twice its water."],
        "r1": [
            "Pouvez-vous me dire comment cuire le riz?",
            "Rincez le riz, puis faites-le mijoter doucement.",
        ],
        "r2": ["What is the capital of France?", "The capital of France is Paris, on the river Seine."],
    }
    rows = [
        {
            "id": k,
            "origin": "test",
            "messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}],
        }
        for k, (u, a) in turns.items()
    ]
    data = tmp_path / "data"
    tables.write(str(data / "part-0.parquet"), rows, tables.conversations_schema())
    arabic = "الطقس جميل اليوم ونريد أن نذهب إلى الحديقة مع الأصدقاء."
    with ModelServer(model="m", replies={t: arabic for pair in turns.values() for t in pair}) as s:
        recipe = write_recipe(
            tmp_path,
            {
                "translate-x": {
                    "stage": "translate",
                    "inputs": {"data": str(data), "model": "tiny:translator"},
                    "config": {
                        "endpoint": {"base_url": f"{s.url}/v1", "model": "m"},
                        "gate": {"length_ratio": [0.1, 10]},
                    },
                }
            },
            store=str(store),
            run="source",
            tiny_models={"pairs": str(PAIRS)},
        )
        assert run_translate(recipe) == 0
        asked = list(s.prompts)
    m = Store(str(store)).read_manifest("source", "translate-x")
    assert m["counts"]["rows_in"] == 3 and m["counts"]["rows_out"] == 2
    assert m["quarantine"]["by_reason"] == {"wrong_language": 1}
    (bad,) = output_rows(store, "source", "translate-x", "quarantine")
    assert bad["id"] == "r1" and bad["detail"].startswith("the source: detected=fr score="), bad["detail"]
    assert not any("riz" in p for p in asked) and len(asked) == 4  # r1 never reached the model


def test_a_model_that_answers_in_persian_or_urdu_is_quarantined_as_wrong_language(
    tmp_path: Path, store: Path
) -> None:
    """Nine rows; the server answers two in Persian and one in Urdu (fluent, Arabic script, the right length):
    those three go to the quarantine as wrong_language with the code and score found, the six others are
    committed, and the counts add up."""
    persian = (LANG / "fa.txt").read_text(encoding="utf-8").splitlines()
    urdu = (LANG / "ur.txt").read_text(encoding="utf-8").splitlines()
    english = [
        "The weather is very nice today and we want to go to the park.",
        "The book I bought yesterday is about the history of the region.",
        "Please send me the report before the meeting starts.",
        "My brother studies computer engineering at the university.",
        "This restaurant serves very tasty traditional dishes.",
        "I have to be at the airport at eight tomorrow morning.",
        "The children are playing football in the school yard.",
        "The price of bread went up again last month.",
        "I drink a glass of black tea every morning.",
    ]
    rows = [
        {
            "id": f"r{i}",
            "origin": "test",
            "messages": [{"role": "user", "content": "Translate this."}, {"role": "assistant", "content": t}],
        }
        for i, t in enumerate(english)
    ]
    data = tmp_path / "data"
    tables.write(str(data / "part-0.parquet"), rows, tables.conversations_schema())
    replies = {english[1]: persian[1], english[4]: persian[4], english[7]: urdu[7]}
    with ModelServer(model="m", replies=replies) as s:
        recipe = write_recipe(
            tmp_path,
            {
                "translate-x": {
                    "stage": "translate",
                    "inputs": {"data": str(data), "model": "tiny:translator"},
                    "config": {"endpoint": {"base_url": f"{s.url}/v1", "model": "m"}, "roles": ["assistant"]},
                }
            },
            store=str(store),
            run="drift",
            tiny_models={"pairs": str(PAIRS)},
        )
        assert run_translate(recipe) == 0
    m = Store(str(store)).read_manifest("drift", "translate-x")
    c = m["counts"]
    assert c["rows_in"] == 9 and c["rows_out"] == 6 and c["rows_quarantined"] == 3
    assert m["quarantine"]["by_reason"] == {"wrong_language": 3}
    got = {o: output_rows(store, "drift", "translate-x", o) for o in ("conversations", "quarantine")}
    assert sorted(r["id"] for r in got["conversations"]) == ["r0", "r2", "r3", "r5", "r6", "r8"]
    found = {r["id"]: r["detail"] for r in got["quarantine"]}
    assert set(found) == {"r1", "r4", "r7"}
    for row_id, code in (("r1", "fa"), ("r4", "fa"), ("r7", "ur")):
        assert f"detected={code} score=" in found[row_id] and "expected ar" in found[row_id], found[row_id]
        assert json.loads(next(r["raw"] for r in got["quarantine"] if r["id"] == row_id))["id"] == row_id


def test_a_second_pair_english_hindi_plans_and_its_translate_and_judge_run(
    tmp_path: Path, store: Path
) -> None:
    """The paper's DAG for English -> Hindi (recipes/switches/target-hi.yaml) plans offline with every
    translate step's languages and prompt changed; its translate and judge run against a stand-in that
    answers in Hindi (the tokenizer a tiny stand-in's): the Devanagari answers are committed, an answer left
    in English is quarantined by the script check and one in Urdu by identification, the judge is asked
    about Hindi and English."""
    from hala.contract import recipe as recipe_mod
    from helpers import hala
    from stages.judge.config import JudgeConfig
    from stages.judge.main import main as judge_main

    sets, _ = recipe_mod.read_set_file(SWITCH_HI)
    paper = recipe_mod.load(PAPER, overrides=sets, check_paths=False)
    translating = [s for s in paper.steps.values() if s.stage == "translate"]
    assert len(translating) == 8
    for s in translating:
        cfg = TranslateConfig.model_validate(s.config)
        assert cfg.languages == ("en", "hi") and "Hindi" in cfg.prompt and "Arabic" not in cfg.prompt, s.name
    assert not any(s.enabled for n, s in paper.steps.items() if n.startswith("evaluate-hala-"))
    plan = hala(
        "run",
        str(PAPER),
        "--set-file",
        str(SWITCH_HI),
        "--dry-run",
        "--json",
        "--store",
        str(tmp_path / "plan"),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert {r["step"] for r in json.loads(plan.stdout)["steps"] if r["state"] == "disabled"} >= {
        "evaluate-hala-9b",
        "publish-hala",
    }

    english, hindi = zip(
        *(line.split("\t") for line in (LANG / "en-hi.tsv").read_text(encoding="utf-8").splitlines())
    )
    urdu = (LANG / "ur.txt").read_text(encoding="utf-8").splitlines()
    rows = [
        {"id": f"r{i}", "origin": "test", "messages": [{"role": "assistant", "content": t}]}
        for i, t in enumerate(english)
    ]
    data = tmp_path / "rows"
    tables.write(str(data / "part-0.parquet"), rows, tables.conversations_schema())
    replies = {e: h for e, h in zip(english, hindi, strict=True)}
    replies[english[3]] = english[3]  # left untranslated
    replies[english[6]] = urdu[6]  # the wrong language, in another script
    prompt = "Translate everything that follows into {target}:\n\n{text}"
    with ModelServer(model="m", prompt=prompt, replies=replies) as s:
        recipe = write_recipe(
            tmp_path / "t",
            {
                "translate-x": {
                    "stage": "translate",
                    "inputs": {"data": str(data), "model": "tiny:translator"},
                    "config": {
                        "endpoint": {"base_url": f"{s.url}/v1", "model": "m"},
                        "direction": "en-hi",
                        "prompt": prompt,
                        "roles": ["assistant"],
                    },
                }
            },
            store=str(store),
            run="hindi",
            tiny_models={"pairs": str(PAIRS)},
        )
        assert run_translate(recipe) == 0
        assert all(p.startswith("Translate everything that follows into Hindi:") for p in s.prompts)
    m = Store(str(store)).read_manifest("hindi", "translate-x")
    assert m["counts"]["rows_in"] == 10 and m["counts"]["rows_out"] == 8
    # English left as it was fails the script check (no Devanagari against the Latin); Urdu, in neither of the
    # pair's scripts, passes it and is identified instead
    assert m["quarantine"]["by_reason"] == {"not_target_language": 1, "wrong_language": 1}
    kept = output_rows(store, "hindi", "translate-x", "conversations")
    assert {r["messages"][0]["content"] for r in kept} == set(hindi) - {hindi[3], hindi[6]}

    pairs = [
        {"id": f"p{i}", "src_lang": "en", "tgt_lang": "hi", "src": e, "tgt": h}
        for i, (e, h) in enumerate(zip(english, hindi, strict=True))
    ]
    tables.write(str(tmp_path / "pairs" / "part-0.parquet"), pairs, tables.pairs_schema())
    with ModelServer(model="judge") as s:
        recipe = write_recipe(
            tmp_path / "j",
            {
                "judge-x": {
                    "stage": "judge",
                    "inputs": {"data": str(tmp_path / "pairs"), "model": "tiny:judge"},
                    "config": {"endpoint": {"base_url": f"{s.url}/v1", "model": "judge"}},
                }
            },
            store=str(store),
            run="hindi",
            tiny_models={"pairs": str(PAIRS)},
        )
        assert (
            step.run("judge", JudgeConfig, judge_main, argv=["--recipe", str(recipe), "--step", "judge-x"])
            == 0
        )
        asked = s.prompts
    assert len(asked) == 10 and all(
        "Is the Hindi text a faithful translation of the English text?" in p for p in asked
    )
    assert all(f"Hindi: {h}" in "".join(asked) for h in hindi)
    c = Store(str(store)).read_manifest("hindi", "judge-x")["counts"]
    assert c["rows_in"] == 10 == c["rows_out"] + c["rows_quarantined"] + sum(c["rows_removed"].values())
