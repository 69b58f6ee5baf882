"""`hala run` on a terminal: one line per step with its state, rows and time, and a bar while it works.

    ✓ prepare-lamini                 done      1.9 s  data=5
    ⠿ translate-lamini               running  12.4 s  [########--------] 4/8 rows  shard 1/2
    · quantize-teacher               cached           model=1

The steps' own output (their JSON events, the engines' log lines) goes to <run>/_logs/<step>.jsonl, not to
the screen; `hala run -v` shows it as it comes instead. Off a terminal the runner writes JSON lines and
never uses this.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import Any, TextIO

MARKS = {"done": "✓", "cached": "·", "failed": "✗", "blocked": "-", "skipped": "-", "running": "⠿"}


def wanted(verbose: bool, json_logs: bool, stream: TextIO | None = None) -> bool:
    """The display replaces the log lines only for a person at a terminal who did not ask for them (-v)."""
    return not verbose and not json_logs and (stream or sys.stdout).isatty()


class Display:
    def __init__(self, names: list[str], stream: TextIO | None = None, tick: float = 0.5):
        self.stream = stream or sys.stdout
        self.width = max([len(n) for n in names] + [12])
        self.lock = threading.Lock()
        self.current: str | None = None
        self.detail = ""
        self.started = 0.0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
        self._ticker.start()

    def _line(self, mark: str, name: str, state: str, seconds: float | None, tail: str) -> str:
        secs = f"{seconds:6.1f} s" if seconds is not None else " " * 8
        text = f"{mark} {name:<{self.width}}  {state:<8} {secs}  {tail}".rstrip()
        cols = shutil.get_terminal_size((120, 20)).columns
        return text[: max(cols - 1, 20)]

    def _draw(self) -> None:
        if self.current is None:
            return
        line = self._line(
            MARKS["running"], self.current, "running", time.monotonic() - self.started, self.detail
        )
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self.lock:
                self._draw()

    def start(self, name: str) -> None:
        with self.lock:
            self.current, self.detail, self.started = name, "", time.monotonic()
            self._draw()

    def progress(self, event: dict[str, Any], shard: str | None = None) -> None:
        done, total, unit = event.get("done", 0), event.get("total"), event.get("unit", "rows")
        if total:
            filled = int(16 * min(done / total, 1.0))
            text = f"[{'#' * filled}{'-' * (16 - filled)}] {done}/{total} {unit}"
        else:
            text = f"{done} {unit}"
        if event.get("rate"):
            text += f"  {event['rate']:g}/s"
        if shard:
            text += f"  shard {shard}"
        with self.lock:
            self.detail = text
            self._draw()

    def note(self, text: str) -> None:
        """A phase of the running step without a count (a shard starting, the gather)."""
        with self.lock:
            self.detail = text
            self._draw()

    def end(
        self,
        name: str,
        state: str,
        seconds: float | None = None,
        rows: dict[str, Any] | None = None,
        note: str = "",
    ) -> None:
        tail = ", ".join(f"{k}={v}" for k, v in (rows or {}).items() if v is not None)
        if note:
            tail = f"{tail}  ({note})" if tail else note
        with self.lock:
            if self.current is not None:
                self.stream.write("\r\x1b[K")
            self.current = None
            self.stream.write(self._line(MARKS.get(state, " "), name, state, seconds, tail) + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=2)
