"""The request loop of the HTTP stand-ins the tests start (hubserver, kubeapi): on 127.0.0.1 only, serving in
a thread until `max_requests` requests were answered or `seconds` passed, whichever comes first, and stopped
by the test's `with` block."""

from __future__ import annotations

import threading
import time
from http.server import HTTPServer
from typing import Any


class Bounded:
    server: HTTPServer
    requests: list[str]

    def bound(self, server: HTTPServer, max_requests: int, seconds: float) -> None:
        self.server, self.requests = server, []
        self.server.timeout = 0.2  # handle_request returns this often, so the bounds are checked
        self.max_requests, self.deadline = max_requests, time.monotonic() + seconds
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while len(self.requests) < self.max_requests and time.monotonic() < self.deadline:
            self.server.handle_request()

    def wake(self) -> None:
        """Let requests held open by the stand-in end (kubeapi's watches)."""

    def __enter__(self) -> Any:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deadline = 0.0
        self.wake()
        self.thread.join(timeout=5)
        self.server.server_close()
