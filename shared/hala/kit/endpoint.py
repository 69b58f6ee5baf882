"""The endpoint engine: a served model behind any OpenAI-compatible chat-completions API (`vllm serve`,
SGLang, TGI, a hosted API), with the calls and outputs of the in-process engines (hala.kit.engine).

    engine:   endpoint
    endpoint: {base_url: "http://teacher:8000/v1", model: teacher, api_key_env: TEACHER_API_KEY,
               max_concurrency: 64}

What a shard needs from a server it does not own:
- requests run concurrently up to `max_concurrency` (one aiohttp session, its connection pool as large), in
  an event loop on a thread of its own, so the next chunk's requests are on the wire while the step gates and
  commits this one (as vLLM's stream does in process);
- 429 (its Retry-After honoured), 5xx, resets, truncated bodies and timeouts are retried with exponential
  backoff and jitter; a request still failing after `retries` fails its chunk with TemporaryError (exit 75):
  nothing of that chunk is committed and the resume starts there;
- an answer that is not JSON or has no choice is asked again `bad_response_retries` times, then its row goes
  to the quarantine as `bad_response` (never a crash, never a silent drop); a request the server refuses (400:
  too long for its context, a malformed message) goes there as `endpoint_rejected` with the server's words;
- 401/403 (the key) and 404 (the model or the URL) are configuration errors (exit 2): no retry cures them;
- the judge's labels through vLLM's structured outputs (`structured_outputs: {choice: [...]}`); a server that
  ignores the field (it answers free text) is detected on the first answer and asked for one token with its
  log-probabilities instead;
- the key is read from the environment variable named by `api_key_env`, sent as a bearer token and nowhere
  else: never in a config, a manifest or a log line.

The client is aiohttp: 0.66 ms of client CPU per request here, against 7.0 ms for httpx and 9.0 ms for
openai's AsyncOpenAI (on httpx) at 32 requests in flight (bench/endpoint_client.py, bench/README.md); and it
gives the retry rules above without a second layer of retries underneath.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hala.contract.errors import ConfigError, TemporaryError

MAX_RETRY_AFTER = 300.0  # a server asking for more than this is treated as down: the chunk fails (exit 75)


class Endpoint(BaseModel):
    """An OpenAI-compatible server (its chat-completions API) the step sends its requests to."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, description="the API's root, with its /v1: http://teacher:8000/v1")
    served: str | None = Field(
        None,
        description="instead of base_url: a model the recipe serves (its `served:` section); the runner "
        "starts it and gives the step its URL",
    )
    model: str | None = Field(
        None, description="the served model's name; default: the only one the server's /v1/models lists"
    )
    api_key_env: str | None = Field(
        None,
        description="NAME of the environment variable that holds the key (never the key itself); sent as "
        "a bearer token",
    )
    max_concurrency: int = Field(64, ge=1, le=4096, description="requests in flight at once, per shard")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to open a connection")
    read_timeout: float = Field(600.0, gt=0, description="seconds to wait for an answer's bytes")
    retries: int = Field(
        8, ge=0, description="retries of a request on 429, 5xx, resets and timeouts before its chunk fails"
    )
    backoff: float = Field(1.0, ge=0, description="first wait before a retry (doubled each time, jittered)")
    max_backoff: float = Field(60.0, ge=0, description="longest wait between two retries")
    bad_response_retries: int = Field(
        2, ge=0, description="asks again for an answer that is not JSON or holds no choice, then quarantines"
    )
    wait_ready: float = Field(
        900.0, ge=0, description="seconds to wait for a server still starting (its /v1/models unanswered)"
    )
    choice: Literal["auto", "structured", "logprobs"] = Field(
        "auto",
        description="how the judge's label is chosen: structured outputs (vLLM), the first token's "
        "log-probabilities, or auto (structured, logprobs if the server ignores it)",
    )

    @model_validator(mode="after")
    def _one_server(self) -> Endpoint:
        if (self.base_url is None) == (self.served is None):
            raise ValueError("endpoint needs base_url (a server of yours) or served (one the recipe serves)")
        return self

    def resolved(self) -> Endpoint:
        """With the URL of a served model filled in from the variable its runner set."""
        if self.served is None:
            return self
        from hala.contract.recipe import served_url_env

        url = os.environ.get(served_url_env(self.served))
        if not url:
            raise ConfigError(
                f"endpoint.served '{self.served}': {served_url_env(self.served)} is not set; `hala run` "
                "starts the served model and sets it (compose and Kubernetes set it in the rendered files); "
                "to run the step alone, serve the model and set that variable to its http://host:port/v1"
            )
        return self.model_copy(update={"base_url": url, "model": self.model or self.served})

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url {value!r} must be http(s)://host[:port]/v1")
        if "@" in value.split("/")[2]:
            raise ValueError(
                "base_url must not hold credentials: put the key in a variable named by api_key_env"
            )
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                "api_key_env is the NAME of an environment variable (TEACHER_API_KEY), not the key: "
                "a key never goes in a recipe"
            )
        return value


class _Latency:
    """Latency percentiles in constant memory: counts in buckets 5% wide (1 ms to an hour)."""

    STEP = math.log(1.05)

    def __init__(self) -> None:
        self.buckets: Counter = Counter()
        self.n = 0

    def add(self, seconds: float) -> None:
        self.buckets[max(0, int(math.log(max(seconds, 1e-3) / 1e-3) / self.STEP))] += 1
        self.n += 1

    def percentile(self, q: float) -> float | None:
        if not self.n:
            return None
        seen, target = 0, q * self.n
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= target:
                return round(1e-3 * math.exp((bucket + 1) * self.STEP), 4)  # the bucket's upper edge
        return None


class _Refused(Exception):
    """The server answered, and what it answered is this request's own problem (quarantine, not retry)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Bad(Exception):
    """A 200 whose body is not a usable answer."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class EndpointEngine:
    name = "endpoint"

    def __init__(self, tokenizer: str, endpoint: Endpoint, *, max_model_len: int, trust_remote_code: bool):
        endpoint = endpoint.resolved()
        t0 = time.monotonic()
        import aiohttp
        from transformers import AutoTokenizer

        self.aiohttp, self.cfg, self.max_model_len = aiohttp, endpoint, max_model_len
        # planning (what fits max_model_len, how long a label is) counts with the served model's tokenizer
        self.tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.headers = {"Content-Type": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise ConfigError(
                    f"endpoint {endpoint.base_url}: the environment variable {endpoint.api_key_env} "
                    "(endpoint.api_key_env) is not set; set it (a Secret on Kubernetes) or drop api_key_env"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.stats: Counter = Counter()
        self.latency = _Latency()
        self.choice_mode = endpoint.choice
        self.served: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hala-endpoint", daemon=True)
        self.thread.start()
        try:
            self._run(self._open())
        except BaseException:
            self.close()
            raise
        self.start_seconds = round(time.monotonic() - t0, 2)

    # --- the event loop's side

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _open(self) -> None:
        aiohttp = self.aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.cfg.max_concurrency, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(
                sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
            ),
            headers=self.headers,
        )
        self.slots = asyncio.Semaphore(self.cfg.max_concurrency)  # FIFO: the head chunk's requests go first
        self.served = await self._models()
        self.model = self.cfg.model or self.served["id"]

    async def _models(self) -> dict[str, Any]:
        """The server's model, once it answers /v1/models (a replica still loading its weights is waited
        for)."""
        url, deadline, last = f"{self.cfg.base_url}/models", time.monotonic() + self.cfg.wait_ready, ""
        while True:
            try:
                async with self.session.get(url) as resp:
                    body = await resp.read()
                    if resp.status in (401, 403):
                        raise ConfigError(self._auth_problem(resp.status))
                    if resp.status == 404:
                        raise ConfigError(
                            f"endpoint {self.cfg.base_url}: GET /models answered 404; base_url must be the "
                            "API's root with its /v1 (http://host:8000/v1)"
                        )
                    if resp.status == 200:
                        models = [m for m in json.loads(body).get("data") or [] if isinstance(m, dict)]
                        return self._pick(models)
                    last = f"HTTP {resp.status}"
            except (*aiohttp_errors(self.aiohttp), json.JSONDecodeError, AttributeError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise TemporaryError(
                    f"endpoint {self.cfg.base_url} not ready after {self.cfg.wait_ready:.0f} s ({last})"
                )
            await asyncio.sleep(min(2.0, max(0.1, self.cfg.wait_ready / 50)))

    def _pick(self, models: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [str(m.get("id")) for m in models]
        if self.cfg.model is None:
            if len(models) != 1:
                raise ConfigError(f"endpoint {self.cfg.base_url} serves {ids}: name one as endpoint.model")
            chosen = models[0]
        else:
            found = [m for m in models if m.get("id") == self.cfg.model]
            if not found:
                raise ConfigError(
                    f"endpoint {self.cfg.base_url} does not serve {self.cfg.model!r} (it serves {ids}); fix "
                    "endpoint.model"
                )
            chosen = found[0]
        keys = ("id", "root", "parent", "max_model_len", "owned_by", "created")
        return {k: chosen[k] for k in keys if chosen.get(k) is not None}

    def _auth_problem(self, status: int) -> str:
        how = (
            f"the key in {self.cfg.api_key_env} was refused"
            if self.cfg.api_key_env
            else "it wants a key: name its variable in endpoint.api_key_env"
        )
        return f"endpoint {self.cfg.base_url} answered {status}: {how}"

    async def _post(self, body: dict[str, Any], parse: Any) -> Any:
        """One request, retried as the module says; `parse(json) -> result` raises _Bad on an unusable
        answer."""
        url, attempt, bad = f"{self.cfg.base_url}/chat/completions", 0, 0
        async with self.slots:
            while True:
                self.stats["requests"] += 1
                t0, wait = time.monotonic(), None
                try:
                    async with self.session.post(url, data=json.dumps(body)) as resp:
                        raw, status = await resp.read(), resp.status
                        wait = _retry_after(resp.headers.get("Retry-After"))
                except TimeoutError:
                    cause, detail = "timeout", f"no answer within {self.cfg.read_timeout:.0f} s"
                except aiohttp_errors(self.aiohttp) as e:
                    cause, detail = "connection", f"{type(e).__name__}: {e}"
                else:
                    if status == 200:
                        try:
                            result = parse(json.loads(raw))
                        except (ValueError, _Bad, KeyError, IndexError, TypeError, AttributeError) as e:
                            bad += 1
                            self.stats["bad_responses"] += 1
                            if bad > self.cfg.bad_response_retries:
                                raise _Refused("bad_response", f"{type(e).__name__}: {e}"[:300]) from None
                            continue
                        self.latency.add(time.monotonic() - t0)
                        return result
                    text = raw[:300].decode("utf-8", "replace")
                    if status in (401, 403):
                        raise ConfigError(self._auth_problem(status))
                    if status == 404:
                        raise ConfigError(f"endpoint {url} answered 404 for model {self.model!r}: {text}")
                    if status == 429 or status >= 500:
                        cause, detail = (
                            ("throttled" if status == 429 else "server_error"),
                            f"HTTP {status}: {text}",
                        )
                    else:
                        self.stats["refused"] += 1
                        raise _Refused("endpoint_rejected", f"HTTP {status}: {text}")
                attempt += 1
                if attempt > self.cfg.retries or (wait is not None and wait > MAX_RETRY_AFTER):
                    raise TemporaryError(f"endpoint {url}: {cause} after {attempt - 1} retries ({detail})")
                self.stats[f"retries_{cause}"] += 1
                if wait is None:
                    wait = min(self.cfg.max_backoff, self.cfg.backoff * 2 ** (attempt - 1))
                    wait *= (
                        0.5 + random.random() / 2
                    )  # jitter: shards that failed together do not retry together
                await asyncio.sleep(wait)

    # --- chat

    def _body(self, conversation: list[dict[str, str]], sampling: Any, **extra: Any) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": conversation,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": sampling.seed,
            **extra,
        }
        if sampling.repetition_penalty != 1.0:  # vLLM's extension; a plain OpenAI API would refuse it
            body["repetition_penalty"] = sampling.repetition_penalty
        return body

    def _generation(self, conversation: list[dict[str, str]], data: dict[str, Any]) -> Any:
        from hala.kit.engine import Generation

        choice = data["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise _Bad(f"message.content is {type(text).__name__}")
        usage = data.get("usage") or {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not isinstance(prompt, int):
            prompt = self.count_tokens(conversation)
        if not isinstance(completion, int):
            completion = len(self.tok.encode(text, add_special_tokens=False))
        self.stats["prompt_tokens"] += prompt
        self.stats["completion_tokens"] += completion
        return Generation(text, prompt, completion, choice.get("finish_reason") != "length")

    async def _generate(self, conversation: list[dict[str, str]], sampling: Any) -> Any:
        from hala.kit.engine import Generation

        try:
            return await self._post(
                self._body(conversation, sampling), lambda data: self._generation(conversation, data)
            )
        except _Refused as e:
            return Generation("", 0, 0, True, error=e.reason, detail=e.detail)

    # --- choose

    def _label_tokens(self, labels: list[str]) -> list[str]:
        """Each label's first token as the server spells it in top_logprobs; they must differ."""
        firsts = [self.tok.decode(self.tok.encode(label, add_special_tokens=False)[:1]) for label in labels]
        if len(set(firsts)) != len(firsts):
            raise ConfigError(
                f"labels {labels} start with the same token ({firsts}) in this tokenizer: the endpoint "
                "cannot tell them apart by log-probabilities; choose labels that differ in their first word, "
                "or a server with structured outputs (endpoint.choice: structured)"
            )
        return firsts

    def _choice(self, labels: list[str], data: dict[str, Any], mode: str) -> Any:
        from hala.kit.engine import Choice

        choice = data["choices"][0]
        if mode == "logprobs":
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            firsts = self._label_tokens(labels)
            seen = {t["token"].strip(): float(t["logprob"]) for t in top}
            scores = {label: seen[f.strip()] for label, f in zip(labels, firsts) if f.strip() in seen}
            if not scores:
                raise _Bad(f"none of {labels} among the first token's top log-probabilities")
            return Choice(max(scores, key=scores.get), scores)
        text = (choice["message"]["content"] or "").strip()
        if text not in labels:
            raise _NotStructured(text)
        return Choice(text)

    async def _pick_label(self, conversation: list[dict[str, str]], labels: list[str]) -> Any:
        from hala.kit.engine import Choice, Sampling, choice_budget

        while True:
            mode = self.choice_mode
            if mode == "logprobs":
                body = self._body(conversation, Sampling(max_tokens=1), logprobs=True, top_logprobs=20)
            else:
                body = self._body(
                    conversation,
                    Sampling(max_tokens=choice_budget(labels)),
                    structured_outputs={"choice": labels},
                )
            try:
                return await self._post(body, lambda data, mode=mode: self._choice(labels, data, mode))
            except _NotStructured as e:
                if mode == "structured":
                    return Choice("", error="bad_response", detail=f"{e.text!r} is not one of {labels}")
                # auto: this server ignores structured outputs (vLLM before 0.10 named them guided_choice;
                # other servers have none); ask every later request for log-probabilities
                self.choice_mode = "logprobs"
                self.stats["choice_fallback"] = 1
            except _Refused as e:
                return Choice("", error=e.reason, detail=e.detail)

    # --- the engine's calls

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        return len(
            self.tok.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )

    async def _all(self, coros: list[Any]) -> list[Any]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(c) for c in coros]
        except BaseExceptionGroup as e:  # the first cause, not the group: exit 75 or 2 by its type
            raise next(iter(_leaves(e))) from None
        return [t.result() for t in tasks]

    def chat(self, conversations: list[list[dict[str, str]]], sampling: Any) -> list[Any]:
        return self._run(self._all([self._generate(c, sampling) for c in conversations]))

    def choose(self, conversations: list[list[dict[str, str]]], labels: list[str]) -> list[Any]:
        return self._run(self._all([self._pick_label(c, labels) for c in conversations]))

    def chat_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], sampling: Any
    ) -> Iterator[tuple[Any, list[Any]]]:
        return self._stream(jobs, lambda convs: self._all([self._generate(c, sampling) for c in convs]))

    def choose_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], labels: list[str]
    ) -> Iterator[tuple[Any, list[Any]]]:
        return self._stream(jobs, lambda convs: self._all([self._pick_label(c, labels) for c in convs]))

    def _stream(self, jobs: Iterable[tuple[Any, Any]], make: Any) -> Iterator[tuple[Any, list[Any]]]:
        """Results of each job in job order, with the next job's requests already sent (two jobs in flight);
        a job that fails raises its error when its results are awaited, the later one is cancelled."""
        pending = iter(jobs)
        queued: deque[tuple[Any, Any]] = deque()

        def submit() -> None:
            job = next(pending, None)  # the caller plans the job here: its errors stay its own
            if job is not None:
                key, conversations = job
                queued.append((key, asyncio.run_coroutine_threadsafe(make(conversations), self.loop)))

        try:
            submit()
            submit()
            while queued:
                key, future = queued[0]
                outs = future.result()
                queued.popleft()
                submit()
                yield key, outs
        finally:
            for _, future in queued:
                future.cancel()

    def info(self) -> dict[str, Any]:
        stats = dict(self.stats)
        return {
            "engine": "endpoint",
            "client": f"aiohttp {self.aiohttp.__version__}",
            "base_url": self.cfg.base_url,
            "model": self.tokenizer,
            "served": self.served,  # the server's own word on what it runs (/v1/models)
            "max_concurrency": self.cfg.max_concurrency,
            "choice": self.choice_mode,
            "requests": stats,
            "latency_seconds": {f"p{int(q * 100)}": self.latency.percentile(q) for q in (0.5, 0.9, 0.99)},
            "start_seconds": getattr(self, "start_seconds", None),
        }

    def close(self) -> None:
        if getattr(self, "session", None) is not None and self.loop.is_running():
            try:
                self._run(self.session.close())
            except Exception:  # noqa: BLE001 - closing a session of a dead server: nothing to keep
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class _NotStructured(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


def aiohttp_errors(aiohttp: Any) -> tuple[type[BaseException], ...]:
    """What a dropped connection looks like to aiohttp: refused, reset, closed mid-answer, a body shorter
    than its Content-Length."""
    return (aiohttp.ClientError, ConnectionError, OSError)
