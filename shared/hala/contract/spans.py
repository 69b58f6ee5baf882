"""Protected spans: text a translator must not touch, taken out before the model sees the text and put back
byte-identical after.

Code (fenced blocks and inline), LaTeX ($$...$$, \\[...\\], \\(...\\), $...$), URLs, e-mail addresses, JSON
objects (tool calls, arguments) and template placeholders ({name}, {{var}}, %s) are replaced by markers
`⟦0⟧`, `⟦1⟧`, ... . `restore` puts each span back where its marker came out and refuses (MarkerError) when
the model dropped, repeated or invented a marker: such a row is quarantined, never patched.

Light on purpose (regular expressions only): the tiny stand-ins are trained on the same masked text.
"""

from __future__ import annotations

import json
import re

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧: rare in natural text, kept as-is by byte-level tokenizers
MARKER = re.compile(OPEN + r"(\d+)" + CLOSE)

# Order matters: earlier patterns win where matches overlap (a $ inside a code block stays code).
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("code_block", re.compile(r"(```|~~~)[^\n]*\n.*?\n?\1", re.S)),
    ("latex_display", re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]", re.S)),
    (
        "latex_inline",
        re.compile(
            r"\\\(.+?\\\)|(?<![\\$\w])\$(?=[^\s$])[^$\n]*?[^\s$\\]\$(?![\w$])|(?<![\\$\w])\$[^\s$\d]\$"
        ),
    ),
    ("code_inline", re.compile(r"`[^`\n]+`")),
    ("url", re.compile(r"\b(?:https?://|www\.)[^\s<>()\"'\]]+[^\s<>()\"'.,;:!?\]]")),
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("placeholder", re.compile(r"\{\{\s*[\w.]+\s*\}\}|\{[A-Za-z_][\w.]*\}|\{\d+\}|%[sd]")),
]
_JSON_START = re.compile(r"[{\[]")


class MarkerError(ValueError):
    """The model's output does not carry every marker exactly once."""


def _json_spans(text: str) -> list[tuple[int, int]]:
    """Objects and arrays that parse as JSON (tool calls, arguments), longest first from each opening
    brace."""
    out: list[tuple[int, int]] = []
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        m = _JSON_START.search(text, pos)
        if not m:
            return out
        try:
            value, end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            pos = m.start() + 1
            continue
        if isinstance(value, (dict, list)) and value and end - m.start() > 2:
            out.append((m.start(), end))
            pos = end
        else:
            pos = m.start() + 1


# A pattern can only match where one of its characters is: most turns hold none of them, and a substring test
# costs far less than a regex scan (translate calls find on every turn: 7 scans a turn were a fifth of its
# time)
_NEEDS = {
    "code_block": ("```", "~~~"),
    "latex_display": ("$$", "\\["),
    "latex_inline": ("\\(", "$"),
    "code_inline": ("`",),
    "url": ("http", "www."),
    "email": ("@",),
    "placeholder": ("{", "%"),
    "json": ("{", "["),
}


def find(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping protected spans as (start, end, kind), in text order."""
    taken: list[tuple[int, int, str]] = []

    def free(s: int, e: int) -> bool:
        return all(e <= a or s >= b for a, b, _ in taken)

    def possible(kind: str) -> bool:
        return any(c in text for c in _NEEDS[kind])

    for kind, pattern in _PATTERNS[:2]:
        if possible(kind):
            taken += [(m.start(), m.end(), kind) for m in pattern.finditer(text) if free(m.start(), m.end())]
    if possible("json"):
        taken += [(s, e, "json") for s, e in _json_spans(text) if free(s, e)]
    for kind, pattern in _PATTERNS[2:]:
        if possible(kind):
            taken += [(m.start(), m.end(), kind) for m in pattern.finditer(text) if free(m.start(), m.end())]
    return sorted(taken)


def protect(text: str) -> tuple[str, list[str], list[str]]:
    """(text with markers, the spans in marker order, their kinds). A text that already holds a marker
    character cannot be protected unambiguously: MarkerError."""
    if OPEN in text or CLOSE in text:
        raise MarkerError(f"the text already contains the marker characters {OPEN}{CLOSE}")
    spans, kinds, parts = [], [], []
    last = 0
    for start, end, kind in find(text):
        parts.append(text[last:start])
        parts.append(f"{OPEN}{len(spans)}{CLOSE}")
        spans.append(text[start:end])
        kinds.append(kind)
        last = end
    parts.append(text[last:])
    return "".join(parts), spans, kinds


def restore(text: str, spans: list[str]) -> str:
    """Put the spans back; every marker must come back exactly once and no other may appear."""
    found = [int(m.group(1)) for m in MARKER.finditer(text)]
    if sorted(found) != list(range(len(spans))):
        missing = sorted(set(range(len(spans))) - set(found))
        extra = sorted({i for i in found if found.count(i) > 1 or i >= len(spans)})
        raise MarkerError(
            f"markers missing {missing[:10]}, repeated or unknown {extra[:10]} (of {len(spans)})"
        )
    return MARKER.sub(lambda m: spans[int(m.group(1))], text)


def only_markers(text: str) -> bool:
    """True when nothing but markers, whitespace and punctuation is left to translate."""
    return not re.search(r"\w", MARKER.sub("", text))
