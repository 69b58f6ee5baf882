"""Languages as data: an ISO 639-1 code, the Unicode scripts it is written in, and what may join the letters
of one word. The translate gate (script share, untranslated leftovers), prepare's pair checks and the stages'
directions read them from here; a new language is a line below, not a change to the code.

    lang = languages.get("fa")           # Language(code='fa', name='Persian', scripts=('Arabic',), ...)
    languages.script_chars(("Arabic",))  # a `re` character class of every character of those scripts

A script's characters are Unicode's Script_Extensions of it (the `regex` package's \\p{scx=...}): for Arabic
that is the letters, the harakat, the Arabic comma, semicolon, question mark and tatweel, and both sets of
Arabic-Indic digits, which is what the hand-written blocks this replaces held. They are read out once into a
plain `re` class: matching with it is 30-45% faster than \\p{scx=...} in `regex` on NTREX text (11.7 against
15.2 ms per 200 kB of Arabic, 10.0 against 14.4 of English, 2026-12-08), with the same counts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from hala.contract.errors import ConfigError

# the highest code point whose scripts are read: the BMP, the SMP, and the CJK extensions up to G
_LAST_CODE_POINT = 0x3134F


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1, as the detectors and the Hub's dataset cards write it
    name: str  # in English, for prompts and messages
    scripts: tuple[str, ...]  # Unicode script names (Script_Extensions), the main one first
    joiners: str = ""  # characters inside a word besides its letters: an apostrophe, a hyphen, ZWNJ


_LATIN_JOINERS = "'’-"
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("ar", "Arabic", ("Arabic",)),
        Language("fa", "Persian", ("Arabic",), "\u200c"),  # ZWNJ joins می‌خواهم
        Language("ur", "Urdu", ("Arabic",), "\u200c"),
        Language("ps", "Pashto", ("Arabic",)),
        Language("en", "English", ("Latin",), _LATIN_JOINERS),
        Language("fr", "French", ("Latin",), _LATIN_JOINERS),
        Language("de", "German", ("Latin",), _LATIN_JOINERS),
        Language("es", "Spanish", ("Latin",), _LATIN_JOINERS),
        Language("it", "Italian", ("Latin",), _LATIN_JOINERS),
        Language("pt", "Portuguese", ("Latin",), _LATIN_JOINERS),
        Language("nl", "Dutch", ("Latin",), _LATIN_JOINERS),
        Language("tr", "Turkish", ("Latin",), _LATIN_JOINERS),
        Language("id", "Indonesian", ("Latin",), _LATIN_JOINERS),
        Language("sw", "Swahili", ("Latin",), _LATIN_JOINERS),
        Language("hi", "Hindi", ("Devanagari",)),
        Language("bn", "Bengali", ("Bengali",)),
        Language("ru", "Russian", ("Cyrillic",), "-"),
        Language("uk", "Ukrainian", ("Cyrillic",), "'’-"),
        Language("el", "Greek", ("Greek",)),
        Language("he", "Hebrew", ("Hebrew",), "'׳"),
        Language("zh", "Chinese", ("Han",)),
        Language("ja", "Japanese", ("Han", "Hiragana", "Katakana")),
        Language("ko", "Korean", ("Hangul", "Han")),
    )
}


def get(code: str, field: str = "language") -> Language:
    """The language of ISO 639-1 `code`; ConfigError naming the field and the known codes otherwise."""
    try:
        return LANGUAGES[code]
    except KeyError:
        known = ", ".join(sorted(LANGUAGES))
        raise ConfigError(
            f"{field}: unknown language {code!r}; known: {known} (a new one is a line in "
            "hala/kit/languages.py)"
        ) from None


@functools.cache
def script_chars(scripts: tuple[str, ...]) -> str:
    """A `re` character class (with its brackets) of every character whose Script_Extensions include one of
    `scripts`, read once from Unicode's data through `regex`."""
    import regex

    every = "".join(map(chr, range(_LAST_CODE_POINT + 1)))
    prop = regex.compile("[" + "".join(rf"\p{{scx={s}}}" for s in scripts) + "]+")
    parts = []
    for m in prop.finditer(every):
        first, last = m.start(), m.end() - 1
        parts.append(_escape(first) if first == last else f"{_escape(first)}-{_escape(last)}")
    if not parts:
        raise ConfigError(f"no Unicode characters have the script(s) {scripts}: check their names")
    return "[" + "".join(parts) + "]"


def _escape(cp: int) -> str:
    return f"\\U{cp:08x}" if cp > 0xFFFF else f"\\u{cp:04x}"


@functools.cache
def script_run(scripts: tuple[str, ...]) -> re.Pattern[str]:
    """Runs of the scripts' characters."""
    return re.compile(script_chars(scripts) + "+")


@functools.cache
def word(code: str) -> str:
    """A `re` pattern of one word of language `code`: its letters, joined by its joiners."""
    lang = get(code)
    letters = script_chars(lang.scripts)
    if not lang.joiners:
        return letters + "+"
    return f"{letters}[{letters[1:-1]}{re.escape(lang.joiners)}]*"


def script_counts(text: str, a: str, b: str) -> tuple[int, int]:
    """(characters in language a's scripts, characters in language b's scripts) in text. Counted by runs, not
    character by character: twice as fast (the translate gate calls it on every turn and output)."""
    la, lb = get(a), get(b)
    return (
        sum(map(len, script_run(la.scripts).findall(text))),
        sum(map(len, script_run(lb.scripts).findall(text))),
    )


def script_share(text: str, lang: str, other: str) -> float | None:
    """Share of the characters written in `lang`'s scripts, among those in `lang`'s and `other`'s; None when
    the text has none of them (numbers, symbols), or when the two languages share a script (Arabic and
    Persian: only language identification tells them apart)."""
    if set(get(lang).scripts) & set(get(other).scripts):
        return None
    mine, theirs = script_counts(text, lang, other)
    if mine + theirs == 0:
        return None
    return mine / (mine + theirs)
