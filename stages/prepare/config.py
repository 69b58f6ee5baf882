"""Typed config of the prepare stage. `config.schema.json` is generated from it (`hala schema prepare
--write`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Format = Literal[
    "alpaca",
    "sharegpt",
    "messages",
    "openorca",
    "qa",
    "lima",
    "columns",
    "translation",
    "pairs",
    "aligned_text",
]

# The fields each format reads, by role; `columns` renames them (e.g. SCP-116K: {user: problem, assistant:
# solution}).
FIELDS: dict[str, dict[str, str | None]] = {
    "alpaca": {
        "instruction": "instruction",
        "input": "input",
        "output": "output",
        "history": "history",
        "system": "system",
    },
    "sharegpt": {"conversations": "conversations", "system": "system", "tools": "tools"},
    "messages": {"messages": "messages", "tools": "tools"},
    "openorca": {"system": "system_prompt", "user": "question", "assistant": "response"},
    "qa": {"user": "question", "assistant": "answer"},
    "lima": {"conversations": "conversations"},
    "columns": {"system": None, "user": None, "input": None, "assistant": None},
    "translation": {"translation": "translation"},
    "pairs": {"src": None, "tgt": None},  # default: the columns named src_lang / tgt_lang, or positions
    "aligned_text": {"src": None, "tgt": None},  # text files: the line itself; tables: the column to take
}
PAIR_FORMATS = {"translation", "pairs", "aligned_text"}


class PrepareConfig(BaseModel):
    """How to read one dataset and which rows to keep."""

    model_config = ConfigDict(extra="forbid")

    format: Format = Field(description="the input's layout (see the stage README for each format's fields)")
    columns: dict[str, str | int | None] = Field(
        default={},
        description="rename the fields a format reads, e.g. {user: problem, assistant: solution}; "
        "format columns needs user and assistant",
    )
    origin: str | None = Field(
        None, description="label written to every row's origin; default: the step name without 'prepare-'"
    )
    file_format: Literal["auto", "json", "jsonl", "parquet", "csv", "tsv", "text"] = Field(
        "auto",
        description="local files and URLs: auto picks by extension (.json array or JSON lines, .jsonl, "
        ".parquet, .csv, .tsv, .txt)",
    )
    files: str | None = Field(
        None, description="glob of files to read when the input is a folder, e.g. '*.jsonl'"
    )
    header: bool = Field(
        True,
        description="csv/tsv: the first line names the columns; false: address columns by position (0, 1)",
    )
    split: str = Field("train", description="hub datasets: the split to read")
    subset: str | None = Field(
        None, description="hub datasets: the configuration, e.g. 'ar-en' for Helsinki-NLP/opus-100"
    )
    target_split: str | None = Field(
        None, description="aligned_text from the hub: the target's split (default: split)"
    )
    target_subset: str | None = Field(
        None, description="aligned_text from the hub: the target's configuration, e.g. AR_XY for openai/MMMLU"
    )
    exclude: dict[str, list[str]] = Field(
        default={},
        description="remove rows whose field has one of these values, e.g. {source: "
        "[ai2-adapt-dev/tulu_v3.9_aya_100k]} "
        "for the English parts of Tulu 3; counted as rows_removed.excluded",
    )
    max_rows: int | None = Field(
        None, ge=1, description="read only the first N rows (the paper takes the first 405K of OpenOrca)"
    )
    drop_code: bool = Field(
        False, description="remove rows with code (fences, code-like lines): the paper did so for Hermes-3"
    )
    dedup: bool = Field(
        True, description="remove exact duplicates (same turns / same pair), keeping the first"
    )
    src_lang: str = Field("en", description="pairs: language of the src column written out")
    tgt_lang: str = Field(
        "ar",
        description="pairs: language of the tgt column written out; swap the two to reverse the direction",
    )
    input_langs: list[str] = Field(
        default=["en", "ar"],
        min_length=2,
        max_length=2,
        description="positional pair inputs (aligned_text, header-less tables): the language of the first "
        "and second side",
    )
    check_script: bool = Field(
        True,
        description="pairs: quarantine a side not written in its language's script (ar: Arabic letters, en: "
        "Latin)",
    )
    roles: dict[str, str] = Field(
        default={}, description="sharegpt: more 'from' values and the role they mean, e.g. {bot: assistant}"
    )
    rows_per_file: int = Field(100_000, ge=1, description="rows per parquet shard written")

    @model_validator(mode="after")
    def _check(self) -> PrepareConfig:
        known = FIELDS[self.format]
        unknown = sorted(set(self.columns) - set(known))
        if unknown:
            raise ValueError(
                f"columns {unknown} mean nothing for format {self.format}; it reads: {', '.join(known)}"
            )
        if self.format == "columns":
            missing = [k for k in ("user", "assistant") if not self.columns.get(k)]
            if missing:
                raise ValueError(
                    f"format columns needs columns.{' and columns.'.join(missing)} (the fields holding each "
                    "turn)"
                )
        bad_roles = sorted(
            r for r in self.roles.values() if r not in ("system", "user", "assistant", "tool", "tool_call")
        )
        if bad_roles:
            raise ValueError(f"roles map to system, user, assistant, tool or tool_call, not {bad_roles}")
        return self

    @property
    def kind(self) -> str:
        return "pairs" if self.format in PAIR_FORMATS else "conversations"

    def field(self, name: str) -> str | int | None:
        """The input field that holds `name` for this format, after the recipe's renames."""
        if name in self.columns:
            return self.columns[name]
        return FIELDS[self.format].get(name)
