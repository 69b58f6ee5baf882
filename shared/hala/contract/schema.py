"""Generate a stage's `config.schema.json` from its typed config (a pydantic model).

The library validates recipes against these files without importing any stage; a test in each stage's
suite (`hala.contract.schema.check`) keeps file and model in agreement. Run in the stage's environment:

    .venvs/<env>/bin/hala schema <stage> --write
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

from hala.contract import stagespec
from hala.contract.errors import ConfigError


def generate(stage: str) -> dict[str, Any]:
    spec = stagespec.find(stage)
    if spec is None:
        raise ConfigError(f"no stage '{stage}'")
    module_name, _, cls_name = spec.config_class.partition(":")
    model = getattr(importlib.import_module(module_name), cls_name)
    schema = model.model_json_schema()
    clash = stagespec.RESERVED_CONFIG_KEYS & set(schema.get("properties", {}))
    if clash:
        raise ConfigError(
            f"stage '{stage}': config keys {sorted(clash)} are reserved for the recipe's step level"
        )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"generated from {spec.config_class} by `hala schema {stage} --write`; do not edit",
        **schema,
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def check(stage: str) -> str | None:
    """None when the file equals the generated schema, else a message saying what to run."""
    spec = stagespec.find(stage)
    assert spec is not None
    want = render(generate(stage))
    have = spec.schema_path.read_text() if spec.schema_path.exists() else ""
    if want != have:
        return (
            f"{spec.schema_path} is out of date with {spec.config_class}; run `hala schema {stage} "
            "--write` in its environment"
        )
    return None


def main(stage: str, write: bool = False, check_only: bool = False) -> int:
    if check_only:
        problem = check(stage)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    text = render(generate(stage))
    if write:
        spec = stagespec.find(stage)
        assert spec is not None
        spec.schema_path.write_text(text)
        print(f"wrote {spec.schema_path}")
    else:
        sys.stdout.write(text)
    return 0
