"""Hub inputs are keyed by a commit, never by a name whose content can change (issue 18).

`hub:ORG/NAME` resolves to the commit its default branch names when the hub answers (here a stand-in of the
hub's repository API on 127.0.0.1, tests/_lib/hubserver.py, that HF_ENDPOINT points huggingface_hub at); the
commit goes into the step's fingerprint and its manifest, so a moved branch plans the step again. `hala pin
RECIPE` writes those commits into the lock beside the recipe, which the recipe then reads offline. An input
pinned by nothing, with no hub to ask, is exit 2 with that advice; a dry run warns for each one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from helpers import hala, manifest, write_recipe
from hubserver import Hub

SHA1, SHA2 = "1" * 40, "2" * 40
FIXTURES = Path(__file__).resolve().parent / "fixture_stages"


@pytest.fixture(autouse=True)
def _echo_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `echo` test stage: found through HALA_STAGES_PATH, imported through PYTHONPATH."""
    monkeypatch.setenv("HALA_STAGES_PATH", str(FIXTURES))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    )


def _recipe(tmp_path: Path, model: str = "hub:acme/base-model") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(4)))
    # the echo fixture ignores `after`: the hub input shapes only the cache key, which is what is tested
    return write_recipe(
        tmp_path, {"echo-rows": {"stage": "echo", "inputs": {"data": str(data), "after": model}}}
    )


def _state(path: Path, env: dict[str, str]) -> tuple[str, list[dict]]:
    out = hala("run", str(path), "--dry-run", "--json", env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr
    plan = json.loads(out.stdout)  # one JSON document, the warnings in it
    warnings = [w for w in plan["warnings"] if w["warning"] == "hub input not pinned"]
    return plan["steps"][0]["state"], warnings


def test_an_unpinned_hub_input_is_resolved_to_its_commit_and_a_moved_branch_runs_the_step_again(
    tmp_path: Path,
) -> None:
    path = _recipe(tmp_path)
    offline = {"HF_HUB_OFFLINE": "1", "HALA_LOG_FORMAT": "json"}
    # no hub to ask, nothing pinned: exit 2 with the fix, and nothing committed
    result = hala("run", str(path), env=offline)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "is not pinned to a revision" in result.stdout and "hala pin" in result.stdout
    assert not (tmp_path / "store" / "r" / "echo-rows" / "_MANIFEST.json").exists()
    state, warnings = _state(path, offline)  # a plan still plans it, and warns
    assert state.startswith("will run") and [w["repo"] for w in warnings] == ["acme/base-model"]

    with Hub() as hub:
        hub.repos[("model", "acme/base-model")] = {"main": SHA1}
        online = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": hub.url, "HALA_LOG_FORMAT": "json"}
        assert hala("run", str(path), env=online).returncode == 0
        recorded = manifest(tmp_path / "store", "r", "echo-rows")["inputs"]["after"]
        assert (recorded["revision"], recorded["pinned"], recorded["repo_type"]) == (
            SHA1,
            "resolved",
            "model",
        )
        assert _state(path, online)[0] == "cached"
        hub.repos[("model", "acme/base-model")] = {"main": SHA2}  # someone pushed to main
        assert _state(path, online)[0] == "will run"
        assert any(r.startswith("/api/models/acme/base-model") for r in hub.requests)


def test_hala_pin_writes_the_lock_that_the_recipe_then_reads_offline(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    with Hub() as hub:
        hub.repos[("model", "acme/base-model")] = {"main": SHA1}
        online = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": hub.url, "HALA_LOG_FORMAT": "json"}
        pinned = hala("pin", str(path), env=online)
        assert pinned.returncode == 0, pinned.stdout + pinned.stderr
        lock = path.with_name("recipe.lock.yaml")
        assert yaml.safe_load(lock.read_text())["hub"] == {"model:acme/base-model": SHA1}
        assert "hala pin" in lock.read_text().splitlines()[0]  # says what wrote it

        offline = {"HF_HUB_OFFLINE": "1", "HALA_LOG_FORMAT": "json"}
        state, warnings = _state(path, offline)
        assert state == "will run" and warnings == []  # pinned: no warning, and no hub needed
        assert hala("run", str(path), env=offline).returncode == 0
        recorded = manifest(tmp_path / "store", "r", "echo-rows")["inputs"]["after"]
        assert (recorded["revision"], recorded["pinned"]) == (SHA1, "lock")

        # the branch moves; the lock holds the step where it was until `hala pin` runs again
        hub.repos[("model", "acme/base-model")] = {"main": SHA2}
        assert _state(path, online)[0] == "cached"
        assert hala("pin", str(path), env=online).returncode == 0
        assert yaml.safe_load(lock.read_text())["hub"] == {"model:acme/base-model": SHA2}
        assert _state(path, offline)[0] == "will run"

        # a repository the hub does not know: exit 2 naming it, and the lock is left as it was
        bad = _recipe(tmp_path / "bad", "hub:acme/no-such-model")
        refused = hala("pin", str(bad), env=online)
        assert refused.returncode == 2 and "hub:acme/no-such-model" in refused.stdout
        assert not bad.with_name("recipe.lock.yaml").exists()


def test_a_recipe_pin_wins_and_a_dataset_input_asks_the_dataset_api(tmp_path: Path) -> None:
    from hala.contract import recipe as recipe_mod

    path = write_recipe(
        tmp_path,
        {
            "prepare-a": {
                "stage": "prepare",
                "inputs": {"source": f"hub:acme/corpus@{SHA2}"},
                "config": {"format": "messages"},
            },
            "prepare-b": {
                "stage": "prepare",
                "inputs": {"source": "hub:acme/corpus"},
                "config": {"format": "messages"},
            },
        },
    )
    path.with_name("recipe.lock.yaml").write_text(yaml.safe_dump({"hub": {"dataset:acme/corpus": SHA1}}))
    r = recipe_mod.load(str(path))
    a, b = r.steps["prepare-a"].inputs["source"], r.steps["prepare-b"].inputs["source"]
    assert (a.revision, a.pinned, a.hub_type) == (SHA2, "recipe", "dataset")
    assert (b.revision, b.pinned, b.hub_type) == (SHA1, "lock", "dataset")
    assert recipe_mod.unpinned_hub_inputs(r) == []
