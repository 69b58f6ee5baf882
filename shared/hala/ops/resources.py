"""What one container of a step needs on a cluster: GPUs, FP8 hardware, CPU, memory, shared memory.

The compose and Kubernetes renderers both ask here, so the two never disagree. A step's `resources:` in
the recipe wins; what it leaves out is derived from the stage and its config:

    gpus   train: config.processes; translate, judge, evaluate: engine_args.tensor_parallel_size (1), 0
           with an endpoint (the model is served elsewhere: the step is a CPU client); quantize: 1;
           prepare, merge, publish: 0 (CPU stages)
    fp8    the step runs FP8 weights: a quantize step with an FP8 scheme (its fidelity check serves the
           result) or a step whose model input is such a step's output. Native FP8 needs compute
           capability >= 8.9 (Ada, Hopper, Blackwell); the renderers pin those steps to such nodes.
    shm    1Gi for stages that run vLLM or torch data loaders (Docker's 64 MiB default fails vLLM)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hala.contract.recipe import Recipe, Step
from hala.kit.engine import FP8_MIN_CAPABILITY

GPU_STAGES_WITH_ENGINE = {"translate", "judge", "evaluate"}
CPU_STAGES = {"prepare", "merge", "publish"}
# the one threshold: the stages check it at engine start, the renderers place FP8 steps by it
__all__ = ["FP8_MIN_CAPABILITY", "Needs", "needs"]


@dataclass(frozen=True)
class Needs:
    gpus: int
    fp8: bool
    cpu: str | None
    memory: str | None
    shm: str | None


def _is_fp8_quantize(step: Step) -> bool:
    return step.stage == "quantize" and "FP8" in str(step.config.get("scheme", "FP8_DYNAMIC")).upper()


def _client(step: Step) -> bool:
    """A step that sends its requests to a served model: no GPU, no vLLM in its container."""
    return bool(step.config.get("endpoint")) or step.config.get("engine") == "endpoint"


def _gpus(step: Step) -> int:
    if step.stage == "train":
        return int(step.config.get("processes", 1))
    if step.stage in GPU_STAGES_WITH_ENGINE:
        if _client(step):
            return 0
        return int((step.config.get("engine_args") or {}).get("tensor_parallel_size", 1))
    if step.stage in CPU_STAGES:
        return 0
    return 1


def needs(recipe: Recipe, step: Step) -> Needs:
    given: dict[str, Any] = step.resources
    upstream_fp8 = any(
        ref.kind == "step" and ref.step in recipe.steps and _is_fp8_quantize(recipe.steps[ref.step])
        for name, ref in step.inputs.items()
        if name in ("model", "reference")
    )
    gpus = int(given.get("gpus", _gpus(step)))
    fp8 = bool(given.get("fp8", gpus > 0 and (_is_fp8_quantize(step) or upstream_fp8)))
    heavy = step.stage not in ("prepare", "publish") and not _client(step)
    return Needs(
        gpus=gpus,
        fp8=fp8,
        cpu=None if given.get("cpu") is None else str(given["cpu"]),
        memory=given.get("memory"),
        shm=given.get("shm", "1Gi" if heavy else None),
    )


def served_needs(recipe: Recipe, name: str) -> Needs:
    """What one replica of a served model needs: its GPUs (tensor_parallel_size unless given), FP8 hardware
    when it serves a quantize step's FP8 output, 1Gi of shared memory (vLLM)."""
    entry = recipe.served[name]
    given = entry.resources
    gpus = int(given.get("gpus", int(entry.engine_args.get("tensor_parallel_size", 1))))
    ref = entry.model
    upstream_fp8 = (
        ref.kind == "step" and ref.step in recipe.steps and _is_fp8_quantize(recipe.steps[ref.step])
    )
    return Needs(
        gpus=gpus,
        fp8=bool(given.get("fp8", gpus > 0 and upstream_fp8)),
        cpu=None if given.get("cpu") is None else str(given["cpu"]),
        memory=given.get("memory"),
        shm=given.get("shm", "1Gi"),
    )
