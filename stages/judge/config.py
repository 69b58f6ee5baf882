"""Typed config of the judge stage. `config.schema.json` is generated from it (`hala schema judge --write`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class JudgeConfig(BaseModel):
    """How to judge one pairs dataset."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["auto", "vllm", "transformers"] = Field("auto", description="auto: vLLM where installed, else transformers")
    engine_args: dict[str, Any] = Field(default={}, description="passed to vllm.LLM unchanged")
    dtype: str = Field("auto", description="model dtype for the engine")
    max_model_len: int = Field(2048, ge=64, description="a pair whose prompt does not fit is quarantined as too_long")
    batch_size: int = Field(16, ge=1, description="transformers engine: prompts per forward pass")
    prompt: str = Field(
        "You are a strict bilingual judge. Is the Arabic text a faithful translation of the English text? "
        "Answer ACCEPT or REJECT.\n\nEnglish: {src}\nArabic: {tgt}",
        description="the user turn; {src} and {tgt} are the pair",
    )
    labels: list[str] = Field(default=["ACCEPT", "REJECT"], min_length=2, description="the verdicts; the first one accepts")
    chunk_rows: int = Field(512, ge=1, description="rows per committed chunk: a restarted shard resumes after the last one")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        if "{src}" not in self.prompt or "{tgt}" not in self.prompt:
            raise ValueError("prompt must contain {src} and {tgt}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must differ")
        return self
