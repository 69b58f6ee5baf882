"""A stand-in for an OpenAI-compatible model server (`vllm serve`'s API), on 127.0.0.1 only, that can
misbehave.

    with ModelServer(model="tiny", prompt=TRANSLATE_PROMPT, faults={"429": 0.1, "reset": 0.05}) as s:
        ... engine endpoint, base_url = s.url + "/v1"

It answers `GET /v1/models` and `POST /v1/chat/completions` deterministically, as the instant engine does: a
"translation" maps the Latin letters of the text after `prompt`'s prefix to Arabic ones (so the quality gate
passes it), a judge's label is chosen from `structured_outputs.choice` by a hash of the prompt (one in ten
rejected), or given as first-token log-probabilities (`label_tokens`, the labels' first tokens) when the
request asks for them. `structured=False` makes
it ignore structured outputs and answer free text, as a server without them does.

Faults, each drawn per request with its probability (seeded, so a run is repeatable):
    429        Too Many Requests with Retry-After: 1
    500        Internal Server Error
    slow       the right answer after `slow_seconds`
    truncated  the headers of the whole body, half of it, then the connection closed
    not_json   a 200 whose body is JSON cut in half (its Content-Length true)
    no_choice  a 200 with `choices: []`
    reset      the connection reset (RST) without an answer
`fail_ids` holds prompts that always get 400 (a request the server refuses); `replies` maps a text to the
answer for every prompt that holds it (a model that drifts into another language). The server stops after
`max_requests` requests or `seconds`; every request's path and fault is counted in `log`.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bounded import Bounded

_LATIN_TO_ARABIC = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهابتثجحخدذرزسشصضطظعغفقكلمنه",
)
TRANSLATE_PROMPT = "Translate everything that follows into Arabic:\n\n{text}"


class _Server(ThreadingHTTPServer):
    request_queue_size = (
        256  # a real server's backlog (uvicorn: 2048), not socketserver's 5: 64 clients connect at once
    )
    daemon_threads = True


class ModelServer(Bounded):
    def __init__(
        self,
        model: str = "served-model",
        prompt: str = TRANSLATE_PROMPT,
        faults: dict[str, float] | None = None,
        seed: int = 0,
        slow_seconds: float = 1.5,
        structured: bool = True,
        key: str | None = None,
        fail_texts: tuple[str, ...] = (),
        label_tokens: tuple[str, str] = ("ACC", "REJ"),
        replies: dict[str, str] | None = None,
        max_requests: int = 5000,
        seconds: float = 600.0,
        port: int = 0,
    ):
        self.model, self.prefix = model, prompt.partition("{text}")[0]
        self.faults, self.slow_seconds, self.structured = faults or {}, slow_seconds, structured
        self.key, self.fail_texts, self.label_tokens = key, fail_texts, label_tokens
        self.replies = replies or {}
        self.prompts: list[str] = []  # every user turn asked, in arrival order
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.log: Counter = Counter()
        self.auth_seen: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server: resets hit pooled connections

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server.requests.append(self.path)
                if not server.authorized(self.headers.get("Authorization")):
                    return self.send(401, {"error": {"message": "invalid api key"}})
                if self.path.rstrip("/") != "/v1/models":
                    return self.send(404, {"error": {"message": f"no route {self.path}"}})
                self.send(200, server.models())

            def do_POST(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not server.authorized(self.headers.get("Authorization")):
                    return self.send(401, {"error": {"message": "invalid api key"}})
                if self.path != "/v1/chat/completions":
                    return self.send(404, {"error": {"message": f"no route {self.path}"}})
                request = json.loads(body)
                if request.get("model") != server.model:
                    return self.send(404, {"error": {"message": f"model {request.get('model')} not found"}})
                fault = server.draw()
                server.log[fault or "ok"] += 1
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return None
                if fault == "429":
                    return self.send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
                if fault == "500":
                    return self.send(500, {"error": {"message": "engine hiccup"}})
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                status, answer = server.answer(request)
                data = json.dumps(answer, ensure_ascii=False).encode()
                if fault == "no_choice" and status == 200:
                    data = json.dumps({**answer, "choices": []}).encode()
                if fault == "not_json" and status == 200:
                    data = data[: len(data) // 2]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "truncated" and status == 200:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return None
                self.wfile.write(data)
                return None

            def send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass  # the connection this handler reset or cut

            def log_message(self, *args: Any) -> None:
                pass

        http = _Server(("127.0.0.1", port), Handler)
        self.bound(http, max_requests, seconds)

    def authorized(self, header: str | None) -> bool:
        if header:
            self.auth_seen.append(header)
        return self.key is None or header == f"Bearer {self.key}"

    def draw(self) -> str | None:
        with self.lock:
            roll = self.rng.random()
        for name, p in self.faults.items():
            if roll < p:
                return name
            roll -= p
        return None

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "root": f"/models/{self.model}",
                    "max_model_len": 2048,
                    "owned_by": "hala-tests",
                }
            ],
        }

    def answer(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        content = request["messages"][-1]["content"]
        with self.lock:
            self.prompts.append(content)
        if any(t in content for t in self.fail_texts):
            return 400, {"error": {"message": "This model's maximum context length is 2048 tokens"}}
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        labels = (request.get("structured_outputs") or {}).get("choice")
        if request.get("logprobs"):
            accept, reject = self.label_tokens
            order = [accept, reject] if zlib.crc32(content.encode()) % 10 else [reject, accept]
            top = [{"token": t, "logprob": lp} for t, lp in zip(order, (-0.1, -2.5))]
            choice.update(
                message={"role": "assistant", "content": order[0]},
                logprobs={"content": [{"token": order[0], "logprob": -0.1, "top_logprobs": top}]},
            )
        elif labels and self.structured:
            pick = labels[1] if zlib.crc32(content.encode()) % 10 == 0 else labels[0]
            choice["message"] = {"role": "assistant", "content": pick}
        elif labels:
            choice["message"] = {"role": "assistant", "content": "I would say the translation is fine."}
        else:
            text = content.removeprefix(self.prefix).translate(_LATIN_TO_ARABIC)
            text = next((reply for key, reply in self.replies.items() if key in content), text)
            choice["message"] = {"role": "assistant", "content": text}
        text = choice["message"]["content"]
        return 200, {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "model": self.model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(content) // 4 + 1,
                "completion_tokens": len(text) // 4 + 1,
                "total_tokens": (len(content) + len(text)) // 4 + 2,
            },
        }


def main() -> None:
    """As a process (a recipe's `served.<name>.command` in the tests): serve until killed or bounded."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seconds", type=float, default=600.0)
    args = p.parse_args()
    server = ModelServer(model=args.model, port=args.port, max_requests=100000, seconds=args.seconds)
    server.thread.run()  # in this thread: the process lives as long as the request loop


if __name__ == "__main__":
    main()
