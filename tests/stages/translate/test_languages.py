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
