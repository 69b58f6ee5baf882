"""Typed config of the evaluate stage. `config.schema.json` is generated from it (`hala schema evaluate
--write`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from hala.kit.engine import EngineConfig

# what each kind reads beyond the model (the inputs are optional in stage.toml: which ones depends on the
# kind)
NEEDS = {
    "translation": {"data": "a prepared pairs dataset (src, tgt)"},
    "fp8_acceptance": {
        "data": "a prepared pairs dataset (src, tgt)",
        "reference": "the source model the FP8 checkpoint was made from",
    },
    "benchmarks": {},
}

# The Open Arabic LLM Leaderboard v2 tasks the paper reports (ALRAGE left out: its metric is a 72B judge).
OALL_V2 = ["alghafa", "arabic_mmlu", "arabic_exams", "madinah_qa", "aratrust", "arabic_mmlu_ht"]


class EvaluateConfig(EngineConfig):
    """What to measure, and how (the engine fields are EngineConfig's: translation and fp8_acceptance generate
    with them, benchmarks with benchmark_engine: vllm read dtype, max_model_len and engine_args)."""

    kind: Literal["translation", "fp8_acceptance", "benchmarks"] = Field(
        ...,
        description="translation: BLEU and chrF++ of model (and base) on a parallel set; fp8_acceptance: "
        "the FP8 "
        "model against its source on the same set, quality and throughput; benchmarks: the Arabic "
        "multiple-choice tasks",
    )
    # --- translation and fp8_acceptance
    prompt: str = Field(
        "Translate everything that follows into Arabic:\n\n{text}",
        description="the user turn per source text; {text} is it",
    )
    direction: Literal["en-ar", "ar-en"] = Field(
        "en-ar", description="a pair stored the other way round is flipped"
    )
    tokenize: Literal["13a", "intl"] = Field(
        "13a", description="sacrebleu BLEU tokenizer (flores200's needs a download)"
    )
    max_rows: int | None = Field(None, ge=1, description="score the first N pairs only")
    max_tokens: int = Field(256, ge=1, description="greedy generation length per translation")
    max_quality_drop: float = Field(
        0.5, ge=0, description="fp8_acceptance: chrF++ points the FP8 model may lose before exit 3"
    )
    # --- benchmarks
    harness: Literal["lighteval"] = Field(
        "lighteval", description="LightEval 0.13 with its own OALL v2 task definitions"
    )
    tasks: list[str] = Field(
        default_factory=lambda: list(OALL_V2),
        min_length=1,
        description="task families (alghafa, arabic_mmlu, ...) or single tasks (arabic_mmlu:Driving Test)",
    )
    few_shot: int = Field(0, ge=0, description="OALL v2 is 0-shot")
    chat_template: bool = Field(
        False,
        description="apply the model's chat template to the prompts (recorded; the leaderboard does not)",
    )
    max_samples: int | None = Field(
        None, ge=1, description="score at most N questions per task (LightEval's max_samples)"
    )
    benchmark_engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="LightEval's transformers backend, or vLLM's prompt log-probabilities (the serving "
        "engine; uses dtype, max_model_len and engine_args). On CPU with small models transformers starts "
        "faster",
    )
    benchmark_batch_size: int = Field(16, ge=1, description="LightEval transformers backend batch size")
    trust_data_origin: Literal["real", "format_only"] = Field(
        "real",
        description="format_only: the local data is a handful of items written to the task's format (the "
        "tiny "
        "recipe); the report marks such scores as checking the format, not the model",
    )

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.kind != "benchmarks" and "{text}" not in self.prompt:
            raise ValueError("prompt has no {text} placeholder")
        if self.kind == "benchmarks" and self.endpoint is not None:
            raise ValueError(
                "endpoint: benchmarks run through LightEval on the model in process; a served model can be "
                "evaluated with kind translation"
            )
        return self


def check_inputs(cfg: EvaluateConfig, inputs: Mapping[str, Any]) -> None:
    """The inputs the kind reads (recipe.load runs this for the dry run and at the step's start)."""
    for name, what in NEEDS[cfg.kind].items():
        if name not in inputs:
            raise ValueError(f"kind {cfg.kind} needs input '{name}' ({what})")
