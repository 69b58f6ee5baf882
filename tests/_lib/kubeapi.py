"""A stand-in for the Kubernetes API server's Job list and watch, on 127.0.0.1 only, for the conductor's watch.

It serves what `KubeJobs.wait` asks through the official client: `GET /apis/batch/v1/namespaces/NS/jobs` (a
JobList with the current resourceVersion) and the same path with `watch=true&resourceVersion=V&timeoutSeconds=T`,
which streams the changes after V as JSON lines and ends the watch, waits for the next change up to T seconds, or
answers an ERROR event with code 410 (Expired) when V is older than the versions it keeps, as an API server does
once etcd compacted them. The test makes changes (`change(name)`) and forgets history (`forget()`); every request
path is recorded. The server stops after `max_requests` requests or `seconds`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from bounded import Bounded


def _job(name: str, ns: str, version: int) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns, "resourceVersion": str(version)},
            "spec": {"template": {"spec": {"containers": [{"name": "step"}]}}}, "status": {}}


class KubeAPI(Bounded):
    def __init__(self, ns: str = "hala", max_requests: int = 200, seconds: float = 120.0):
        self.ns = ns
        self.version = 5
        self.oldest = 0  # watches from before this version get 410 Gone
        self.events: list[tuple[int, str]] = []  # (version, job name)
        self.changed = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                api.requests.append(self.path)
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if url.path != f"/apis/batch/v1/namespaces/{api.ns}/jobs":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if query.get("watch", "").lower() != "true":
                    body = {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {"resourceVersion": str(api.version)}, "items": []}
                    self.wfile.write(json.dumps(body).encode())
                    return
                for line in api.watch(int(query.get("resourceVersion", "0")), float(query.get("timeoutSeconds", "5"))):
                    self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.bound(server, max_requests, seconds)

    def watch(self, since: int, timeout: float) -> list[dict[str, Any]]:
        """The events a watch from `since` gets before it ends (the server ends it after the first batch)."""
        end = time.monotonic() + min(timeout, 30.0)
        with self.changed:
            while True:
                if since < self.oldest:
                    return [{"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                                         "message": f"too old resource version: {since} ({self.oldest})",
                                                         "reason": "Expired", "code": 410}}]
                fresh = [(v, n) for v, n in self.events if v > since]
                if fresh:
                    return [{"type": "MODIFIED", "object": _job(n, self.ns, v)} for v, n in fresh]
                left = end - time.monotonic()
                if left <= 0:
                    return []  # the watch's timeout: it ends with no event
                self.changed.wait(left)

    def change(self, name: str) -> None:
        with self.changed:
            self.version += 1
            self.events.append((self.version, name))
            self.changed.notify_all()

    def forget(self) -> None:
        """Compact the history: every version a client holds now is too old."""
        with self.changed:
            self.version += 1
            self.oldest = self.version
            self.events.clear()
            self.changed.notify_all()

    def kubeconfig(self) -> str:
        return json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "test",
                           "clusters": [{"name": "test", "cluster": {"server": self.url}}],
                           "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": self.ns}}],
                           "users": [{"name": "test", "user": {}}]})

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()
