"""Small text measures shared by the stages: which script the letters of a text are written in."""

from __future__ import annotations

import re

ARABIC = re.compile(r"[\u0600-\u06FF\u0750-\u077F\u08A0-\u08FF\uFB50-\uFDFF\uFE70-\uFEFF]")
LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")
LATIN_LANGS = {"en", "fr", "de", "es", "it", "pt", "nl"}


ARABIC_RUN = re.compile(ARABIC.pattern + "+")
LATIN_RUN = re.compile(LATIN.pattern + "+")


def script_counts(text: str) -> tuple[int, int]:
    """(Arabic letters, Latin letters) in text. Counted by runs of letters, not letter by letter: twice as
    fast (the translate gate calls it on every turn and output)."""
    return sum(map(len, ARABIC_RUN.findall(text))), sum(map(len, LATIN_RUN.findall(text)))


def script_share(text: str, lang: str) -> float | None:
    """Share of the letters written in `lang`'s script; None when the text has no letters (numbers, symbols)
    or the language is neither Arabic nor a Latin-script one."""
    arabic, latin = script_counts(text)
    if arabic + latin == 0:
        return None
    if lang == "ar":
        return arabic / (arabic + latin)
    if lang in LATIN_LANGS:
        return latin / (arabic + latin)
    return None
