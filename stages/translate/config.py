"""Typed config of the translate stage. `config.schema.json` is generated from it (`hala schema translate
--write`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hala.contract.errors import ConfigError
from hala.kit import languages
from hala.kit.engine import EngineConfig, Sampling

PROMPT_SLACK = 16  # chat-template tokens around the unit, on top of the prompt's own

Output = Literal["conversations", "pairs", "tuples"]


class LanguageId(BaseModel):
    """Language identification of every translated turn (hala.kit.langid, offline): a turn the identifier
    takes for another language than the target, or for the target with less than min_confidence, goes to
    the quarantine as wrong_language with the language it found and its score. The script checks cannot do
    this where two languages share a script (Arabic, Persian, Urdu). With check_source_language, a source
    row (its turns together, one call a row) identified as another language than the source with
    min_confidence is quarantined too. A turn over hala.kit.langid.MAX_CHARS (1,000) characters is identified
    by its head and tail."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="identify every translated turn (and each source row, see check_source_language)"
    )
    min_confidence: float = Field(
        0.3,
        ge=0,
        le=1,
        description="the identifier's probability for the target language at least this (the lowest of 2,000 "
        "NTREX Arabic sentences was 0.49)",
    )
    min_letters: int = Field(
        20,
        ge=1,
        description="shorter turns (letters, protected spans left out) are not identified: too little text "
        "to tell languages apart; the script checks still apply",
    )


class Gate(BaseModel):
    """Checks on every translated turn (protected spans are left out of every measure)."""

    model_config = ConfigDict(extra="forbid")

    min_target_script: float = Field(
        0.5, ge=0, le=1, description="share of letters in the target's script (Arabic for ar)"
    )
    max_source_run: int = Field(
        4,
        ge=1,
        description="this many words in a row still in the source's script: an untranslated "
        "leftover (names and terms of fewer words pass)",
    )
    length_ratio: list[float] = Field(
        default=[0.3, 3.0],
        min_length=2,
        max_length=2,
        description="output/input length in characters must fall in this band",
    )
    max_repeat: int = Field(
        4,
        ge=2,
        description="the same 3-word run this many times, or a character 30 times in a row: degeneration",
    )
    language_id: LanguageId = Field(default_factory=LanguageId, description="language identification")


class TranslateConfig(EngineConfig):
    """How to translate one dataset (the engine fields are EngineConfig's; a turn longer than max_model_len
    allows is split into paragraphs, then sentences)."""

    prompt: str = Field(
        "Translate everything that follows into {target}:\n\n{text}",
        description="the user turn sent for each unit; {text} is the unit, {source} and {target} the "
        "languages' names (English, Arabic)",
    )
    source: str = Field("en", description="the language translated from (ISO 639-1: en, ar, fr, ...)")
    target: str = Field("ar", description="the language translated into (ISO 639-1: ar, fa, hi, sw, ...)")
    direction: str | None = Field(
        None, description="SOURCE-TARGET in one (en-ar, ar-en, en-fa): sets source and target"
    )
    roles: list[Literal["system", "user", "assistant"]] = Field(
        default=["system", "user", "assistant"],
        description="turns translated; tool turns and tool calls are never sent",
    )
    unit: Literal["turn", "paragraph"] = Field(
        "turn",
        description="turn: a whole turn per request (split only when too long); paragraph: each paragraph "
        "on its own",
    )
    sampling: dict[str, float | int] = Field(
        default={"temperature": 0.0, "max_tokens": 1024},
        description="temperature, top_p, max_tokens, repetition_penalty, seed",
    )
    outputs: list[Output] = Field(
        default=["conversations"], min_length=1, description="which outputs to write"
    )
    chunk_rows: int = Field(
        256, ge=1, description="rows per committed chunk: a restarted shard resumes after the last one"
    )
    gate: Gate = Field(default_factory=Gate, description="quality gate thresholds")
    check_source_language: bool = Field(
        True, description="quarantine a turn that is not in the source language (wrong_language)"
    )

    @model_validator(mode="after")
    def _check(self) -> TranslateConfig:
        named = {"source": "source", "target": "target"}
        if self.direction is not None:
            parts = self.direction.split("-")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"direction {self.direction!r}: write SOURCE-TARGET, e.g. en-ar")
            self.source, self.target = parts
            self.direction = None  # one spelling in the cache key: en-ar and source/target are the same step
            named = {"source": "direction", "target": "direction"}
        for field in ("source", "target"):
            try:
                languages.get(getattr(self, field), named[field])
            except ConfigError as e:
                raise ValueError(str(e)) from None
        if self.source == self.target:
            raise ValueError(f"source and target are both {self.source!r}")
        if "{text}" not in self.prompt:
            raise ValueError("prompt must contain {text}, where each unit goes")
        try:
            self.prompt.format(text="", source="", target="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"prompt: only {{text}}, {{source}} and {{target}} are filled in ({e!r}); write a literal "
                "brace twice: {{ }}"
            ) from None
        unknown = set(self.sampling) - {"temperature", "top_p", "max_tokens", "repetition_penalty", "seed"}
        if unknown:
            raise ValueError(
                f"sampling keys {sorted(unknown)} are unknown; use temperature, top_p, max_tokens, "
                "repetition_penalty, seed"
            )
        if self.gate.length_ratio[0] >= self.gate.length_ratio[1]:
            raise ValueError("gate.length_ratio must be [low, high] with low < high")
        max_tokens = self.sampling.get("max_tokens", Sampling.max_tokens)
        if self.max_model_len - max_tokens <= PROMPT_SLACK:
            raise ValueError(
                f"max_model_len {self.max_model_len} leaves no room beside sampling.max_tokens {max_tokens}: "
                f"the prompt needs more than {PROMPT_SLACK} tokens; raise max_model_len or lower max_tokens"
            )
        return self

    @property
    def languages(self) -> tuple[str, str]:
        return self.source, self.target

    def request(self, text: str) -> str:
        """The user turn for one unit: the prompt with {text}, and {source} and {target} as language names."""
        names = {"source": languages.get(self.source).name, "target": languages.get(self.target).name}
        return self.prompt.format(text=text, **names)
