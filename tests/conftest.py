"""Fixtures shared by every test suite (each suite runs in its own environment: keep this file to
the standard library, pytest and the common library's own dependencies)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# huggingface_hub reads these when it is imported, before any fixture runs: no test may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The team's real public data (../shared/data beside the checkout); tests read it in place, never copy
    it."""
    path = Path(os.environ.get("HALA_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(
            f"the real test data is missing: {path} (set HALA_SHARED_DATA to the team's shared/data folder)"
        )
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, no writes to the home directory: caches go to a temporary folder."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HALA_CACHE", str(cache / "hala"))
    # tiny stand-ins are content-addressed and deterministic: `hala test` shares one folder of them between
    # suites
    monkeypatch.setenv("HALA_TINY_CACHE", os.environ.get("HALA_TINY_CACHE") or str(cache / "tiny"))
    monkeypatch.setenv("HALA_LOG_FORMAT", "json")
