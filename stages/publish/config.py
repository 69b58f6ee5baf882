"""Typed config of the publish stage. `config.schema.json` is generated from it (`hala schema publish
--write`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PublishConfig(BaseModel):
    """Where and how the step's inputs go on the Hub."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Hub user or organisation the repositories go under",
    )
    names: dict[str, str] = Field(
        default={}, description="input -> repository name (default: the output's folder name)"
    )
    private: bool = Field(True, description="create the repositories private")
    license: str = Field(
        "cc-by-nc-4.0",
        description="license of the published artifacts; the paper's models are CC-BY-NC-4.0 "
        "because OpenOrca's GPT outputs, LIMA and the teacher are non-commercial",
    )
    token_env: str = Field(
        "HF_TOKEN",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="environment variable holding the token (a Kubernetes Secret in the cluster); never "
        "logged",
    )
    dry_run: bool = Field(
        False,
        description="write the cards and the plan only; also what happens without a token or a reachable Hub",
    )
    commit_message: str = Field("Published by the Hala pipeline", description="commit message of each upload")


def check_inputs(cfg: PublishConfig, inputs: Mapping[str, Any]) -> None:
    """What is published are the step's inputs, each a step output of this run (recipe.load runs this for the
    dry run and at the step's start)."""
    if not inputs:
        raise ValueError("nothing to publish; add inputs, e.g. hala_9b: merge-hala-9b")
    unknown = sorted(set(cfg.names) - set(inputs))
    if unknown:
        raise ValueError(f"names for {', '.join(unknown)}, which are not inputs; inputs: {', '.join(inputs)}")
    for name, ref in inputs.items():
        if ref.kind != "step":
            raise ValueError(
                f"input '{name}' ({ref.raw}) is not a step output; publish takes what this run made, so that "
                "its card can tell where it comes from"
            )
