"""Typed config of the judge stage. `config.schema.json` is generated from it (`hala schema judge
--write`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from hala.kit import languages
from hala.kit.engine import EngineConfig


class JudgeConfig(EngineConfig):
    """How to judge one pairs dataset (the engine fields are EngineConfig's; a pair whose prompt does not fit
    max_model_len is quarantined as too_long)."""

    prompt: str = Field(
        "You are a strict bilingual judge. Is the {tgt_lang} text a faithful translation of the {src_lang} "
        "text? Answer ACCEPT or REJECT.\n\n{src_lang}: {src}\n{tgt_lang}: {tgt}",
        description="the user turn; {src} and {tgt} are the pair, {src_lang} and {tgt_lang} the names of its "
        "languages (from the pair's src_lang and tgt_lang: English, Arabic)",
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
        try:
            self.prompt.format(src="", tgt="", src_lang="", tgt_lang="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"prompt: only {{src}}, {{tgt}}, {{src_lang}} and {{tgt_lang}} are filled in ({e!r}); "
                "write a literal brace twice: {{ }}"
            ) from None
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must differ")
        return self

    def request(self, pair: dict) -> str:
        """The user turn for one pair: its texts, and its languages by name (the code itself when the language
        is not in hala.kit.languages)."""
        names = {
            f"{side}_lang": languages.LANGUAGES[code].name if code in languages.LANGUAGES else str(code)
            for side, code in (("src", pair.get("src_lang") or "en"), ("tgt", pair.get("tgt_lang") or "ar"))
        }
        return self.prompt.format(src=pair["src"], tgt=pair["tgt"], **names)
