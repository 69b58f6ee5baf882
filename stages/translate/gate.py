"""The quality gate: every translated turn passes it or its row goes to the quarantine with the reason."""

from __future__ import annotations

import re
from collections import Counter

from hala.contract import spans
from hala.kit.text import script_share
from stages.translate.config import Gate

_RUN = re.compile(r"(.)\1{29,}", re.S)
_WORD = {"en": r"[A-Za-z\u00C0-\u024F][A-Za-z\u00C0-\u024F'’-]*", "ar": r"[\u0600-\u06FF\u0750-\u077F]+"}


def _longest_run(text: str, lang: str) -> int:
    """Most consecutive words in `lang`'s script (separated only by spaces and light punctuation)."""
    word = _WORD.get(lang)
    if word is None:
        return 0
    runs = re.findall(rf"(?:{word}[\s,;:]+)*{word}", text)
    return max((len(re.findall(word, r)) for r in runs), default=0)


def _clean(text: str) -> str:
    return spans.MARKER.sub(" ", text)


def check(src: str, out: str, gate: Gate, src_lang: str, tgt_lang: str) -> tuple[str, str] | None:
    """(reason, detail) when the translation `out` of `src` (both with markers, not yet restored) fails."""
    s, o = _clean(src).strip(), _clean(out).strip()
    if not o and s:
        return "empty_output", "the model returned nothing to translate this turn"
    tgt_share = script_share(o, tgt_lang)
    if script_share(s, src_lang) is not None and tgt_share is not None:
        if tgt_share < gate.min_target_script:
            return (
                "not_target_language",
                f"{tgt_share:.0%} of the letters are in the {tgt_lang} script (min "
                f"{gate.min_target_script:.0%})",
            )
        run = _longest_run(o, src_lang)
        if run >= gate.max_source_run:
            return (
                "untranslated",
                f"{run} words in a row are still in the {src_lang} script (max {gate.max_source_run - 1})",
            )
    if len(s) >= 20:  # short turns vary too much in length to judge by it
        ratio = len(o) / len(s)
        low, high = gate.length_ratio
        if not low <= ratio <= high:
            return "length_ratio", f"output/input length {ratio:.2f} outside [{low}, {high}]"
    words = o.split()
    if len(words) >= 3:
        top = Counter(zip(words, words[1:], words[2:])).most_common(1)[0]
        if top[1] >= gate.max_repeat:
            return "repetition", f"{' '.join(top[0])!r} {top[1]} times"
    if _RUN.search(o):
        return "repetition", "a character repeated 30 times in a row"
    return None
