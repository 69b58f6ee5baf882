"""A fault-injecting HTTP proxy for the object-store tests, on 127.0.0.1 only, between s3fs and an S3 API
server.

Each request is forwarded to the upstream server unless the schedule picks a fault for it:

    slowdown     503 SlowDown, not forwarded (throttling: the request had no effect)
    internal     500 InternalError after forwarding (the request took effect, its answer was lost)
    reset        the upstream answer's head and half its body, then a TCP reset (a dropped connection)
    stall        no answer for `stall_s`, longer than the client's read timeout, then the connection closes
    deny         403 InvalidAccessKeyId, not forwarded (what S3 answers to credentials it does not know)
    down         a TCP reset, not forwarded (the store is gone: an outage, a partition)

The schedule is a seeded random draw per request (`rates`: kind -> fraction), so a run is reproducible in what
it injects (not in which request gets it: the clients' concurrency orders requests). `target` gives a fault to
the next requests that match a pattern, whatever the rates (e.g. the one renewal of a lease whose answer is
lost). `hold` pauses requests whose path matches, so a test can kill a process at that exact moment and drop
what it was sending. Bounded: `max_requests` answered at most, each connection times out after 30 s idle, and
`stop()` ends it.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KINDS = ("slowdown", "internal", "reset", "stall", "deny", "down")
_ERROR = {
    "deny": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        rates: dict[str, float] | None = None,
        seed: int = 0,
        stall_s: float = 5.0,
        max_requests: int = 50_000,
    ):
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self.upstream = (host, int(port))
        assert host == "127.0.0.1", "the proxy forwards to a server on 127.0.0.1 only"
        self.rates = dict(rates or {})
        self.random = random.Random(seed)
        self.stall_s, self.max_requests = stall_s, max_requests
        self.counts: Counter = Counter()  # requests, forwarded, and one key per fault kind
        self.lock = threading.Lock()
        self.hold_pattern: re.Pattern[str] | None = None
        self.drop_held = False
        self.held = threading.Event()  # set when a request matching hold_pattern arrived (and is being held)
        self.release = threading.Event()
        self.targets: list[list[Any]] = []  # [pattern, kind, how many more]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def set_rates(self, rates: dict[str, float]) -> None:
        with self.lock:
            self.rates = dict(rates)

    def hold(self, pattern: str | None) -> None:
        """Pause every request whose `METHOD path` matches `pattern` until `release_held()` (or the proxy
        stops)."""
        self.held.clear()
        self.release.clear()
        self.drop_held = False
        self.hold_pattern = re.compile(pattern) if pattern else None

    def release_held(self, forward: bool) -> None:
        """Let the held requests go on to the server, or drop them (their client was killed while they
        waited)."""
        self.drop_held = not forward
        self.hold_pattern = None
        self.release.set()

    def target(self, pattern: str, kind: str, count: int = 1) -> None:
        """The next `count` requests whose `METHOD path` matches `pattern` get `kind`."""
        assert kind in KINDS, kind
        with self.lock:
            self.targets.append([re.compile(pattern), kind, count])

    def _targeted(self, line: str) -> str | None:
        with self.lock:
            for entry in self.targets:
                if entry[2] > 0 and entry[0].search(line):
                    entry[2] -= 1
                    self.counts["requests"] += 1
                    self.counts[entry[1]] += 1
                    return entry[1]
        return None

    def faults(self) -> dict[str, int]:
        return {k: self.counts[k] for k in KINDS}

    def _draw(self) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.counts["requests"] > self.max_requests:
                return "stall"
            x = self.random.random()
            for kind in KINDS:
                x -= self.rates.get(kind, 0.0)
                if x < 0:
                    self.counts[kind] += 1
                    return kind
            self.counts["forwarded"] += 1
            return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
            timeout = 30

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in ("transfer-encoding", "connection")
                    }
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    return resp.status, resp.getheaders(), resp.read()
                finally:
                    conn.close()

            def _send(
                self, status: int, headers: list[tuple[str, str]], body: bytes, cut: bool = False
            ) -> None:
                self.send_response_only(status)
                for k, v in headers:
                    if k.lower() not in (
                        "transfer-encoding",
                        "connection",
                        "content-length",
                        "date",
                        "server",
                    ):
                        self.send_header(k, v)
                length = next((v for k, v in headers if k.lower() == "content-length"), None)
                self.send_header(
                    "Content-Length", length if self.command == "HEAD" and length else str(len(body))
                )
                self.end_headers()
                if self.command == "HEAD":
                    return
                if cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    return self._reset()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                if proxy.hold_pattern is not None and proxy.hold_pattern.search(
                    f"{self.command} {self.path}"
                ):
                    proxy.held.set()
                    proxy.release.wait(timeout=120)
                    if proxy.drop_held:
                        return self._reset()  # the client is gone: the request never reaches the server
                kind = proxy._targeted(f"{self.command} {self.path}") or proxy._draw()
                if kind == "down":
                    return self._reset()
                if kind in ("slowdown", "deny"):
                    return self._error(kind)
                if kind == "stall":
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                status, headers, payload = self._forward(body)
                if kind == "internal":
                    return self._error(kind)
                if kind == "reset" and (self.command == "HEAD" or len(payload) < 2):
                    return self._reset()  # nothing to cut: the request took effect, its answer never comes
                self._send(status, headers, payload, cut=kind == "reset")

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _error(self, kind: str) -> None:
                status, code, message = _ERROR[kind]
                xml = (
                    '<?xml version="1.0" '
                    f'encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<RequestId>fault-proxy</RequestId></Error>"
                ).encode()
                self._send(status, [("Content-Type", "application/xml")], xml)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
