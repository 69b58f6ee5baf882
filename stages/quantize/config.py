"""Typed config of the quantize stage. `config.schema.json` is generated from it (`hala schema quantize
--write`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# compressed-tensors preset schemes llm-compressor applies with a QuantizationModifier
Scheme = Literal[
    "FP8_DYNAMIC", "FP8", "FP8_BLOCK", "W8A8", "W8A16", "W4A16", "W4A16_ASYM", "NVFP4", "NVFP4A16"
]

# presets whose activation scales are static (measured on data): compressed-tensors' preset_name_to_scheme
# gives them input_activations.dynamic other than True (FP8: False; NVFP4: "local", a static global scale).
# Written here so that any environment can check a recipe; tests/stages/quantize checks it against
# compressed-tensors.
STATIC_ACTIVATIONS = frozenset({"FP8", "NVFP4"})


class QuantizeConfig(BaseModel):
    """How to compress one model and how close to its source it must stay."""

    model_config = ConfigDict(extra="forbid")

    scheme: Scheme = Field(
        "FP8_DYNAMIC",
        description="FP8_DYNAMIC: per-channel FP8 weights, dynamic per-token FP8 "
        "activations, no calibration data (the paper's teacher); W8A8 is the fast scheme on CPU",
    )
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn", description="rtn: round-to-nearest (QuantizationModifier); gptq needs calibration data"
    )
    targets: list[str] = Field(default=["Linear"], description="module types or names to quantize")
    ignore: list[str] = Field(
        default=["lm_head"], description="modules kept in full precision (the paper keeps lm_head)"
    )
    name: str | None = Field(
        None,
        description="output folder name; default <model>-<scheme>, e.g. "
        "command-a-translate-08-2025-FP8-Dynamic",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the source is loaded in"
    )
    device_map: str | None = Field(
        None,
        description="None: load on CPU, llm-compressor onloads layer by layer (its advice for models larger "
        "than GPU memory); 'auto': spread over the visible GPUs, then CPU and disk",
    )
    calibration_rows: int = Field(512, ge=1, description="calibration samples, for schemes that need them")
    max_seq_length: int = Field(
        2048, ge=16, description="calibration and fidelity texts are cut to this many tokens"
    )
    prompt: str = Field(
        "Translate from English to Arabic: {text}",
        description="how a sample pair becomes a chat "
        "(user: the prompt with the source text, assistant: the reference translation)",
    )
    fidelity_rows: int = Field(
        64, ge=1, description="sample rows the source and the quantized model are compared on"
    )
    fidelity_mode: Literal["together", "sequential"] = Field(
        "together",
        description="together: both models in memory; sequential: the source first (its logits kept on "
        "disk), then the quantized model, so the two are never loaded at once (the 111B teacher)",
    )
    max_ppl_increase: float = Field(
        0.05,
        ge=0,
        description="exit 3 when the quantized perplexity exceeds the "
        "source's by more than this fraction (0.05 = 5%)",
    )
    min_argmax_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="optional: exit 3 when fewer positions than this share have the same top token",
    )
    trust_remote_code: bool = Field(
        False, description="never on by default: remote code runs with the job's credentials"
    )

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        if "{text}" not in self.prompt:
            raise ValueError("prompt has no {text} placeholder (where each sample's source text goes)")
        return self


def needs_calibration(cfg: QuantizeConfig) -> bool:
    """Static activation scales (FP8, NVFP4) are measured on data; so is everything GPTQ does."""
    return cfg.algorithm == "gptq" or cfg.scheme in STATIC_ACTIVATIONS


def check_inputs(cfg: QuantizeConfig, inputs: Mapping[str, Any]) -> None:
    """recipe.load runs this for the dry run and at the step's start."""
    if needs_calibration(cfg) and "calibration" not in inputs:
        raise ValueError(
            f"scheme {cfg.scheme} with algorithm {cfg.algorithm} measures activations on data: give the step "
            "an input 'calibration' (a prepared dataset)"
        )
