"""Structured logging and progress for every hala process.

- JSON lines when stdout is not a terminal (containers, Kubernetes, the local runner's pipes), readable
  key=value lines on a terminal; `HALA_LOG_FORMAT=json|console` forces one.
- Every event carries run, step, stage (and shard) once `bind()` was called: they are contextvars, so
  third-party stdlib logging (transformers, datasets, fsspec) gets them too, through the same renderer.
- `Progress` emits `progress` events (done, total, rate, eta_s) at a steady interval and draws a
  progress bar when stderr is a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import structlog

_configured = False


def _want_json() -> bool:
    forced = os.environ.get("HALA_LOG_FORMAT", "").lower()
    if forced in ("json", "console"):
        return forced == "json"
    return not sys.stdout.isatty()


def setup(level: str | None = None) -> None:
    """Configure structlog and route stdlib logging through it. Idempotent."""
    global _configured
    level_name = (level or os.environ.get("HALA_LOG_LEVEL", "INFO")).upper()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if _want_json():
        renderer: Any = structlog.processors.JSONRenderer(ensure_ascii=False)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty(), sort_keys=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_hala", False):
            root.removeHandler(old)
    handler._hala = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level_name)
    # Libraries log at INFO a lot (httpx, filelock); keep their noise out unless asked for.
    for noisy in (
        "httpx",
        "filelock",
        "urllib3",
        "fsspec",
        "asyncio",
        "botocore",
        "aiobotocore",
        "s3fs",
        "gcsfs",
        "google.auth",
        "aiohttp",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)
    _configured = True


def get(name: str = "hala") -> structlog.stdlib.BoundLogger:
    if not _configured:
        setup()
    return structlog.get_logger(name)


def bind(**fields: Any) -> None:
    """Attach fields (run, step, stage, shard) to every later event of this process."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in fields.items() if v is not None})


def clear() -> None:
    structlog.contextvars.clear_contextvars()


def console() -> bool:
    """True when this process renders for a person (a terminal), not for a log collector."""
    return not _want_json()


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain text table for terminals (`hala status`, the end of `hala run`)."""
    cells = [["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def progress_interval() -> float:
    return float(os.environ.get("HALA_PROGRESS_EVERY", "5"))


class Progress:
    """Counts work and reports it at a steady interval; a bar on a terminal.

    Use as a context manager; `update(n)` after each unit or batch. The last event (done) is always
    emitted, so short jobs still leave one progress record in the log.
    """

    def __init__(self, total: int | None, unit: str = "rows", what: str = "work", every: float | None = None):
        self.total = total
        self.unit = unit
        self.what = what
        self.every = progress_interval() if every is None else every
        self.done = 0
        self.extra: dict[str, Any] = {}  # e.g. tokens done and tokens/s, carried by the next events
        self.log = get("hala.progress")
        self._start = time.monotonic()
        self._last = self._start
        self._bar = None
        if sys.stderr.isatty() and os.environ.get("HALA_PROGRESS_BAR", "1") != "0":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=f" {unit}", desc=what, leave=False, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def note(self, **fields: Any) -> None:
        """Fields that later progress events carry besides done/total/rate/ETA (e.g. tokens, tokens_per_s)."""
        self.extra.update(fields)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit(final=False)

    def _emit(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        fields: dict[str, Any] = {
            "what": self.what,
            "done": self.done,
            "unit": self.unit,
            "rate": round(rate, 2),
            "elapsed_s": round(elapsed, 2),
        }
        if self.total is not None:
            fields["total"] = self.total
            fields["eta_s"] = round((self.total - self.done) / rate, 1) if rate > 0 else None
        if final:
            fields["final"] = True
        self.log.info("progress", **fields, **self.extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._emit(final=True)
