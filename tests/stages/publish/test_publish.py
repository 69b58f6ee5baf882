"""publish in dry-run mode (no token, no network here): the cards say where each artifact comes from, the plan
lists every file, and the token never shows."""

from __future__ import annotations

import json
from pathlib import Path

from hala.contract import schema
from helpers import REPO, hala, output_dir, write_recipe

SAMPLES = REPO / "recipes" / "samples"


def recipe(tmp_path: Path, publish: dict) -> Path:
    steps = {
        "prepare-lamini": {
            "stage": "prepare",
            "inputs": {"source": str(SAMPLES / "lamini.jsonl")},
            "config": {"format": "columns", "columns": {"user": "instruction", "assistant": "response"}},
        },
        "merge-hala-350m": {
            "stage": "merge",
            "inputs": {"model": "tiny:lfm2-350m", "base": "tiny:lfm2-350m"},
            "config": {"t": 0.5},
        },
        "publish-hala": {
            "stage": "publish",
            "inputs": {"corpus": "prepare-lamini", "hala_350m": "merge-hala-350m"},
            "config": publish,
        },
    }
    return write_recipe(
        tmp_path,
        steps,
        store=str(tmp_path / "store"),
        tiny_models={"pairs": str(SAMPLES / "pairs.en-ar.tsv")},
    )


def test_schema_file_matches_the_typed_config() -> None:
    assert schema.check("publish") is None


def test_without_a_token_the_step_writes_cards_and_the_plan_and_succeeds(tmp_path: Path) -> None:
    path = recipe(tmp_path, {"namespace": "hala-test", "names": {"hala_350m": "Hala-350M-tiny"}})
    result = hala("run", str(path), env={"HF_TOKEN": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    out = output_dir(tmp_path / "store", "r", "publish-hala", "plan")
    plan = json.loads((out / "plan.json").read_text())
    assert (
        plan["mode"] == "dry-run"
        and plan["reason"] == "no token in $HF_TOKEN"
        and plan["license"] == "cc-by-nc-4.0"
    )
    repos = {r["repo_id"]: r for r in plan["repos"]}
    assert set(repos) == {"hala-test/Hala-350M-tiny", "hala-test/data"}
    model = repos["hala-test/Hala-350M-tiny"]
    assert model["type"] == "model" and {"config.json", "model.safetensors", "tokenizer.json"} <= {
        f["path"] for f in model["files"]
    }
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in model["files"])
    assert repos["hala-test/data"]["type"] == "dataset"
    card = (out / model["card"]).read_text(encoding="utf-8")
    assert card.startswith('---\nlicense: "cc-by-nc-4.0"')
    assert "`merge-hala-350m` (merge" in card and "tiny:lfm2-350m" in card
    # the merge stage's own card follows
    assert "Card written by the producing stage" in card and "slerp" in card


def test_a_token_with_no_reachable_hub_is_a_dry_run_and_the_token_never_shows(tmp_path: Path) -> None:
    secret = "hf_secretvalue1234567890"
    path = recipe(tmp_path, {"namespace": "hala-test", "token_env": "HALA_TEST_TOKEN"})
    result = hala("run", str(path), env={"HALA_TEST_TOKEN": secret, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    plan = json.loads((output_dir(tmp_path / "store", "r", "publish-hala", "plan") / "plan.json").read_text())
    assert plan["mode"] == "dry-run" and plan["reason"].startswith("the Hub cannot be reached")
    leaked = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked and secret not in result.stdout + result.stderr


def test_names_for_inputs_the_step_lacks_fail_with_exit_2(tmp_path: Path) -> None:
    path = recipe(tmp_path, {"namespace": "hala-test", "names": {"hala_9b": "Hala-9B"}})
    result = hala("run", str(path), env={"HF_TOKEN": ""})
    assert (
        result.returncode == 2 and "names for hala_9b, which are not inputs" in result.stdout + result.stderr
    )
