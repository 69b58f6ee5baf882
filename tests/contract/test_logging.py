"""Structured logs: JSON lines off a terminal, every event with run/step/stage, stdlib logging included."""

from __future__ import annotations

import json
import logging

import pytest

from hala.contract import logs


@pytest.fixture(autouse=True)
def _fresh_context() -> None:
    logs.clear()
    yield
    logs.clear()


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_events_carry_the_step_context(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HALA_LOG_FORMAT", "json")
    logs.setup()
    logs.bind(run="tiny", step="prepare-lamini", stage="prepare", shard="1/4")
    logs.get("stages.prepare").info("normalized", rows_out=4)
    logging.getLogger("transformers.modeling_utils").warning("a third-party warning")
    out = _lines(capsys.readouterr().out)
    assert out[0]["event"] == "normalized" and out[0]["rows_out"] == 4
    assert out[1]["event"] == "a third-party warning" and out[1]["logger"] == "transformers.modeling_utils"
    for event in out:
        assert (event["run"], event["step"], event["stage"], event["shard"]) == (
            "tiny",
            "prepare-lamini",
            "prepare",
            "1/4",
        )
        assert event["level"] in ("info", "warning") and event["timestamp"].endswith("Z")


def test_console_format_is_readable(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALA_LOG_FORMAT", "console")
    logs.setup()
    logs.bind(step="prepare-lamini")
    logs.get().info("committed", rows=4)
    line = capsys.readouterr().out.strip()
    assert "committed" in line and "rows=4" in line and "step=prepare-lamini" in line
    with pytest.raises(ValueError):
        json.loads(line)


def test_progress_reports_rate_and_eta_at_an_interval(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HALA_LOG_FORMAT", "json")
    logs.setup()
    with logs.Progress(total=100, unit="rows", what="normalize", every=3600) as progress:
        for _ in range(100):
            progress.update()
    only_final = [e for e in _lines(capsys.readouterr().out) if e["event"] == "progress"]
    assert len(only_final) == 1 and only_final[0]["final"] and only_final[0]["done"] == 100
    with logs.Progress(total=4, every=0) as progress:
        for _ in range(4):
            progress.update()
    events = [e for e in _lines(capsys.readouterr().out) if e["event"] == "progress"]
    assert [e["done"] for e in events] == [1, 2, 3, 4, 4]
    assert all({"rate", "eta_s", "total", "elapsed_s"} <= set(e) for e in events)
    assert events[-2]["eta_s"] == 0
