"""Typed config of the merge stage. `config.schema.json` is generated from it (`hala schema merge --write`).

`t` takes MergeKit's forms: a number; a gradient (a list of numbers interpolated over the layers); or a list
of `{filter, value}` where the first filter contained in a tensor's name wins and one without a filter is the
default. A whole MergeKit YAML config may be given instead, under `mergekit`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Gradient = float | list[float]


class FilteredValue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: str | None = Field(
        None, description="substring of the tensor name, e.g. self_attn, mlp, conv; none: every tensor"
    )
    value: Gradient


TSetting = float | list[float] | list[FilteredValue]


class MergeConfig(BaseModel):
    """How to merge the fine-tuned model with its base."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["slerp", "linear"] | None = Field(
        None, description="slerp (default; the paper) or linear"
    )
    t: TSetting | None = Field(
        None, description="interpolation from base (0) to model (1); default 0.5 (the paper)"
    )
    mergekit: dict[str, Any] | None = Field(
        None,
        description="a MergeKit YAML config (merge_method, base_model, models, parameters, dtype, "
        "out_dtype); its base_model is the input 'base', the other model the input 'model'. Not together "
        "with method or t",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="inputs are cast to it before merging (MergeKit's dtype)"
    )
    out_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="dtype written; default: dtype"
    )
    tokenizer_source: Literal["base", "model"] = Field(
        "base", description="whose tokenizer, chat template and config the merge keeps"
    )
    name: str | None = Field(
        None, description="output folder; default <model>-<method>-t<t>, e.g. Hala-350M-SFT-slerp-t0.5"
    )
    max_shard_size: int = Field(
        5_000_000_000,
        ge=1_000_000,
        description="bytes per safetensors shard written (an index file above one)",
    )
    sample_prompt: str = Field(
        "ما هي عاصمة مصر؟", description="the merged model must answer this before the step commits"
    )

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if self.mergekit is not None and (self.method is not None or self.t is not None):
            raise ValueError(
                "give either mergekit or method/t, not both (mergekit's config holds its own method and t)"
            )
        from hala.contract.errors import ConfigError
        from stages.merge import schedule  # it imports this module: here, not at the top

        try:  # a MergeKit config's own checks, and t's range, before any tensor is read (and in the dry run)
            schedule.check_ranges(schedule.from_config(self))
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self
