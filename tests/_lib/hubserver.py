"""A stand-in for the Hugging Face Hub's repository API, on 127.0.0.1 only, for the tests of pinned hub
inputs.

It answers the one call hala makes of the hub (huggingface_hub's `HfApi.repo_info`, which `HF_ENDPOINT` points
here): `GET /api/models/ORG/NAME[/revision/REV]` and `/api/datasets/...`, with the repository's commit `sha`,
or a 404 whose `X-Error-Code` huggingface_hub turns into RepositoryNotFoundError (RepoNotFound) or
RevisionNotFoundError. Repositories and their branches are set by the test (`hub.repos[("model", "org/name")]
= {"main": sha}`); every request is counted. The server stops after `max_requests` requests or `seconds`,
whichever comes first.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import unquote

from bounded import Bounded


class Hub(Bounded):
    def __init__(self, max_requests: int = 500, seconds: float = 300.0):
        self.repos: dict[tuple[str, str], dict[str, str]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                hub.requests.append(self.path)
                status, body, code = hub.answer(self.path.split("?", 1)[0])
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code:
                    self.send_header("X-Error-Code", code)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.bound(HTTPServer(("127.0.0.1", 0), Handler), max_requests, seconds)

    def answer(self, path: str) -> tuple[int, dict[str, Any], str | None]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if len(parts) < 4 or parts[0] != "api" or parts[1] not in ("models", "datasets"):
            return 404, {"error": "not an API path"}, None
        kind, repo = parts[1][:-1], f"{parts[2]}/{parts[3]}"
        revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
        branches = self.repos.get((kind, repo))
        if branches is None:
            return 404, {"error": f"Repository Not Found for url: {path}"}, "RepoNotFound"
        if revision not in branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound"
        return 200, {"id": repo, "sha": branches[revision], "private": False}, None
