"""The quality gate: every translated turn passes it or its row goes to the quarantine with the reason. The
measures read the step's languages (hala.kit.languages): the target's script share against the source's, the
source's words left untranslated, then what the identifier (hala.kit.langid) takes the turn for."""

from __future__ import annotations

import re
from collections import Counter

from hala.contract import spans
from hala.kit import langid, languages
from stages.translate.config import Gate, LanguageId

_RUN = re.compile(r"(.)\1{29,}", re.S)
_LETTERS = re.compile(r"[^\W\d_]+")


def _longest_run(text: str, lang: str) -> int:
    """Most consecutive words in `lang`'s script (separated only by spaces and light punctuation)."""
    word = languages.word(lang)
    runs = re.findall(rf"(?:{word}[\s,;:]+)*{word}", text)
    return max((len(re.findall(word, r)) for r in runs), default=0)


def _clean(text: str) -> str:
    return spans.MARKER.sub(" ", text)


def _has_letters(text: str, n: int) -> bool:
    """At least n letters in `text` (stops counting there: most turns reach it in their first words)."""
    found = 0
    for word in _LETTERS.finditer(text):
        found += word.end() - word.start()
        if found >= n:
            return True
    return False


def wrong_language(text: str, lang: str, cfg: LanguageId, *, source: bool = False) -> str | None:
    """Why `text` (markers left out) is not `lang` by the identifier, or None: it is, or it is too short to
    tell. A translation must be identified as `lang` with at least min_confidence (what the model wrote has
    to show it is right); a source (a row's turns) fails only when identified as another language with that
    confidence (what we were given is trusted unless shown wrong: on 1,997 NTREX English sentences the
    identifier was unsure of 15 and sure of another language for 2). The detail names what was found and its
    score (`detected=fa score=0.9882`) for the quarantine."""
    if not cfg.enabled:
        return None
    if not _has_letters(text, cfg.min_letters):
        return None
    found, score = langid.identify(text)
    if source and (found == lang or score < cfg.min_confidence):
        return None
    if not source and found == lang and score >= cfg.min_confidence:
        return None
    expected = (
        f"not another language with score >= {cfg.min_confidence}"
        if source
        else (f"{lang} with score >= {cfg.min_confidence}")
    )
    return f"detected={found} score={score:.4f}; expected {expected}"


def check(src: str, out: str, gate: Gate, src_lang: str, tgt_lang: str) -> tuple[str, str] | None:
    """(reason, detail) when the translation `out` of `src` (both with markers, not yet restored) fails."""
    s, o = _clean(src).strip(), _clean(out).strip()
    if not o and s:
        return "empty_output", "the model returned nothing to translate this turn"
    tgt_share = languages.script_share(o, tgt_lang, src_lang)
    if languages.script_share(s, src_lang, tgt_lang) is not None and tgt_share is not None:
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
    wrong = wrong_language(o, tgt_lang, gate.language_id)
    if wrong:
        return "wrong_language", wrong
    return None
