"""Fixtures of the translate suites: a store for the session, and inputs made by the real prepare stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from hala.contract import step
from hala.contract.store import Store
from helpers import REPO, write_recipe
from stages.prepare.config import PrepareConfig
from stages.prepare.main import main as prepare_main

SAMPLES = REPO / "recipes" / "samples"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def prepared(store: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs made by the real prepare stage: samples and the first rows of LIMA and glaive."""
    sources = {
        "scp116k": (
            SAMPLES / "scp116k.jsonl",
            {"format": "columns", "columns": {"user": "problem", "assistant": "matched_solution"}},
        ),
        "tulu3": (SAMPLES / "tulu3.jsonl", {"format": "messages"}),
        "hermes3": (SAMPLES / "hermes3.jsonl", {"format": "sharegpt"}),
        "realign": (SAMPLES / "realign-alpaca.jsonl", {"format": "alpaca"}),
        "lima": (shared_data / "en-lima" / "lima.json", {"format": "alpaca", "max_rows": 30}),
        "glaive": (
            shared_data / "en-glaive-toolcall-demo" / "glaive_toolcall_en_demo.json",
            {"format": "sharegpt", "max_rows": 30},
        ),
    }
    steps = {
        f"prepare-{k}": {"stage": "prepare", "inputs": {"source": str(src)}, "config": cfg}
        for k, (src, cfg) in sources.items()
    }
    recipe = write_recipe(tmp_path_factory.mktemp("prep"), steps, store=str(store), run="inputs")
    for name in steps:
        assert (
            step.run("prepare", PrepareConfig, prepare_main, argv=["--recipe", str(recipe), "--step", name])
            == 0
        )
    st = Store(str(store))  # each committed output, in its attempt's folder
    return {
        k: store
        / "inputs"
        / f"prepare-{k}"
        / st.read_manifest("inputs", f"prepare-{k}")["outputs"]["data"]["path"]
        for k in sources
    }
