"""Typed config of the train stage. `config.schema.json` is generated from it (`hala schema train --write`).

`trainer` is passed to TRL's `SFTConfig` unchanged; its keys are SFTConfig's own fields, listed in the
generated schema so that a misspelt key fails when the recipe is loaded, with "did you mean", before any
GPU is asked for. The keys the stage owns (where checkpoints go, resuming, pushing) are not among them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The stage decides these: checkpoints live in the step's work area, resuming is automatic, publishing
# is the publish stage's job, preparation happens once in the tokenized cache.
OWNED = {
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "logging_dir",
    "dataset_kwargs",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_token",
    "hub_private_repo",
    "hub_always_push",
    "hub_revision",
    "do_train",
    "do_eval",
    "do_predict",
    "use_cpu",
    "no_cuda",
}


def _trainer_schema(schema: dict[str, Any]) -> None:
    """`trainer`'s keys in the generated schema: SFTConfig's own fields, read from TRL. Called only when the
    schema is generated (`hala schema train --write`, in the train environment), so this module imports
    without TRL: any environment can check a recipe (recipe.typed_problems)."""
    from trl import SFTConfig

    # the keys the stage owns are listed too, so that setting one gets the validator's "set by the stage", not
    # "unknown"
    keys = sorted(f.name for f in dataclasses.fields(SFTConfig) if f.init and not f.name.startswith("_"))
    schema.update({"properties": {k: {} for k in keys}, "additionalProperties": False})


@functools.cache
def trainer_keys() -> frozenset[str]:
    """SFTConfig's arguments as the generated schema lists them (the train suite keeps the file equal to
    TRL)."""
    schema = json.loads((Path(__file__).parent / "config.schema.json").read_text())
    return frozenset(schema["properties"]["trainer"]["properties"]) - OWNED


DIRECTION = re.compile(r"^[a-z]{2,3}-[a-z]{2,3}$")


class LoraSettings(BaseModel):
    """LoRA (peft) instead of full fine-tuning; the adapter is merged into the base before commit."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="rank")
    alpha: int = Field(32, ge=1, description="lora_alpha")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="peft target_modules ('all-linear' or module names)"
    )


class TrainConfig(BaseModel):
    """How to fine-tune the base model on the step's data inputs."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["pairs", "conversations"] = Field(
        ...,
        description="pairs: translation pairs -> prompt/completion, loss on the completion (the translator); "
        "conversations: chats, loss on assistant turns only (the Hala models)",
    )
    prompt: str | dict[str, str] | None = Field(
        None,
        description="task pairs: the instruction, with {text}; one string for every direction or "
        "{direction: prompt}",
    )
    directions: list[str] = Field(
        ["en-ar"],
        min_length=1,
        description="task pairs: directions to train, e.g. [en-ar] or [en-ar, ar-en]; "
        "a pair stored the other way round is flipped",
    )
    span_markers: bool = Field(
        True,
        description="task pairs: also train on the masked form (⟦n⟧ markers) of pairs whose protected spans "
        "(code, "
        "LaTeX, URLs) match on both sides, so the translator carries the translate stage's markers through",
    )
    mixture: dict[str, float] | None = Field(
        None,
        description="data input -> weight (default 1.0 each): 2.0 repeats every row twice, 0.5 samples "
        "half, seeded",
    )
    chat_template: str | None = Field(
        None,
        description="a training chat template with {% generation %} markers: the name of one TRL ships "
        "(e.g. lfm2_training, qwen2_5_training) or a .jinja file relative to the recipe; default: the "
        "model's own, "
        "or TRL's training version of it",
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate",
        description="rows longer than trainer.max_length: cut to it, or send to the quarantine (counted "
        "either way)",
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, le=0.5, description="share of the rows held out for eval_loss (0: no eval split)"
    )
    seed: int = Field(42, description="data order, mixture sampling, eval split and model init of new heads")
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="TRL SFTConfig arguments, passed through (learning_rate, max_steps, "
        "num_train_epochs, per_device_train_batch_size, gradient_accumulation_steps, max_length, packing, "
        "packing_strategy, lr_scheduler_type, warmup_ratio, bf16, gradient_checkpointing, use_liger_kernel, "
        "eval_steps, save_steps, ...)",
        json_schema_extra=_trainer_schema,
    )
    lora: LoraSettings | None = Field(
        None, description="train a LoRA adapter instead of all weights (merged before commit)"
    )
    load_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="weights while training: float32 master weights (bf16 compute comes from trainer.bf16)",
    )
    save_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the committed weights"
    )
    accelerate: Literal["none", "ddp", "fsdp"] = Field(
        "none",
        description="multi-GPU strategy: ddp (LFM2 up to ~2B) or fsdp (the 9B); configs in "
        "stages/train/accelerate/",
    )
    processes: int = Field(
        1,
        ge=1,
        description="GPUs (one process each) when accelerate is ddp or fsdp; on a machine "
        "without them the step runs as one process",
    )
    name: str | None = Field(
        None, description="output folder; default <base>-SFT (with -LoRA when lora is set)"
    )
    sample_prompt: str | None = Field(
        None,
        description="the trained model answers it before the step commits; default: the pairs prompt on an "
        "English sentence, or an Arabic question",
    )
    tokenize_workers: int | None = Field(
        None, ge=1, description="processes for tokenization (datasets.map num_proc)"
    )

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: list[str]) -> list[str]:
        for d in v:
            if not DIRECTION.match(d):
                raise ValueError(f"direction {d!r}: expected SRC-TGT language codes, e.g. en-ar")
        return v

    @field_validator("trainer")
    @classmethod
    def _trainer_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(v) & OWNED)
        if owned:
            raise ValueError(
                f"{', '.join(owned)}: set by the stage (checkpoints go to the step's work area, resuming is "
                "automatic)"
            )
        unknown = sorted(set(v) - trainer_keys())
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not SFTConfig arguments of TRL")
        return v

    @field_validator("mixture")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for name, w in (v or {}).items():
            if w <= 0:
                raise ValueError(
                    f"mixture weight of '{name}' is {w}: weights are > 0 (leave an input out to not use it)"
                )
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.task == "pairs":
            if self.prompt is None:
                raise ValueError(
                    'task pairs needs a prompt with {text}, e.g. "Translate everything that follows into '
                    'Arabic:\\n\\n{text}"'
                )
            prompts = (
                self.prompt if isinstance(self.prompt, dict) else {d: self.prompt for d in self.directions}
            )
            for d in self.directions:
                if d not in prompts:
                    raise ValueError(
                        f"prompt has no entry for direction {d}; give one per direction or a single string"
                    )
                if "{text}" not in prompts[d]:
                    raise ValueError(f"prompt for {d} has no {{text}} placeholder")
        elif self.prompt is not None:
            raise ValueError("prompt is for task pairs; conversations carry their own instructions")
        if (
            self.trainer.get("packing")
            and "max_length" in self.trainer
            and self.trainer["max_length"] is None
        ):
            raise ValueError("trainer.packing needs trainer.max_length (the length of a packed sequence)")
        return self

    def prompts(self) -> dict[str, str]:
        assert self.prompt is not None
        return self.prompt if isinstance(self.prompt, dict) else {d: self.prompt for d in self.directions}


def check_inputs(cfg: TrainConfig, inputs: Mapping[str, Any]) -> None:
    """Every input but the model is data; the mixture weighs those (recipe.load runs this for the dry run and
    at the step's start)."""
    names = [n for n in inputs if n != "model"]
    if not names:
        raise ValueError("no data inputs; add e.g. inputs.pairs: <a translate step>.pairs")
    unknown = sorted(set(cfg.mixture or {}) - set(names))
    if unknown:
        raise ValueError(
            f"mixture names {', '.join(unknown)}, which are not data inputs; inputs: {', '.join(names)}"
        )
