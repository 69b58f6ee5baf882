"""Typed config of the judge stage. `config.schema.json` is generated from it (`hala schema judge
--write`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from hala.kit.engine import EngineConfig


class JudgeConfig(EngineConfig):
    """How to judge one pairs dataset (the engine fields are EngineConfig's; a pair whose prompt does not fit
    max_model_len is quarantined as too_long)."""

    prompt: str = Field(
        "You are a strict bilingual judge. Is the Arabic text a faithful translation of the English text? "
        "Answer ACCEPT or REJECT.\n\nEnglish: {src}\nArabic: {tgt}",
        description="the user turn; {src} and {tgt} are the pair",
    )
    labels: list[str] = Field(
        default=["ACCEPT", "REJECT"], min_length=2, description="the verdicts; the first one accepts"
    )
    chunk_rows: int = Field(
        512, ge=1, description="rows per committed chunk: a restarted shard resumes after the last one"
    )

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if "{src}" not in self.prompt or "{tgt}" not in self.prompt:
            raise ValueError("prompt must contain {src} and {tgt}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must differ")
        return self
