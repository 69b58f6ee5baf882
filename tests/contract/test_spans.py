"""Protected spans on real conversations: every span found comes back byte-identical."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hala.contract import spans


def _turns(shared_data: Path) -> list[str]:
    lima = json.loads((shared_data / "en-lima" / "lima.json").read_text())
    texts = [r["instruction"] for r in lima] + [r["output"] for r in lima]
    glaive = json.loads(
        (shared_data / "en-glaive-toolcall-demo" / "glaive_toolcall_en_demo.json").read_text()
    )
    texts += [t["value"] for r in glaive for t in r["conversations"]]
    return texts


def test_round_trip_on_lima_and_glaive(shared_data: Path) -> None:
    kinds: Counter = Counter()
    for text in _turns(shared_data):
        masked, found, k = spans.protect(text)
        kinds.update(k)
        assert spans.restore(masked, found) == text
        for span in found:
            assert span not in spans.MARKER.sub("", masked) or len(span) < 4  # taken out, not copied
    assert (
        kinds["code_block"] >= 190
        and kinds["latex_inline"] > 50
        and kinds["json"] >= 211
        and kinds["url"] > 10
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Solve $x^2 = 4$ now.", ["$x^2 = 4$"]),
        ("It costs $5 and $10.", []),
        ("Use `ls -la` and \\(a+b\\).", ["`ls -la`", "\\(a+b\\)"]),
        ('Reply {"name": "f", "arguments": {"x": 1}} ok', ['{"name": "f", "arguments": {"x": 1}}']),
        ("Dear {name}, see https://example.org/a?b=1.", ["{name}", "https://example.org/a?b=1"]),
        ("```py\nprint('$x$')\n```", ["```py\nprint('$x$')\n```"]),
    ],
)
def test_what_is_protected(text: str, expected: list[str]) -> None:
    assert spans.protect(text)[1] == expected


def test_a_lost_or_repeated_marker_is_refused() -> None:
    masked, found, _ = spans.protect("Compute $a$ and $b$.")
    assert masked == "Compute ⟦0⟧ and ⟦1⟧."
    with pytest.raises(spans.MarkerError, match="missing \\[1\\]"):
        spans.restore("احسب ⟦0⟧.", found)
    with pytest.raises(spans.MarkerError, match="repeated or unknown \\[0\\]"):
        spans.restore("⟦0⟧ ⟦0⟧ ⟦1⟧", found)
    with pytest.raises(spans.MarkerError):
        spans.protect("already has ⟦0⟧")
