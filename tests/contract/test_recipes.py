"""Recipes are validated on load, without importing any stage; every problem is exit 2 and says what to
fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hala.contract import recipe as recipe_mod
from hala.contract.errors import ConfigError
from helpers import REPO, hala, write_recipe

LAMINI = REPO / "recipes" / "samples" / "lamini.jsonl"


def _prepare(source: str = str(LAMINI), **config) -> dict:
    return {
        "stage": "prepare",
        "inputs": {"source": source},
        "config": {
            "format": "columns",
            "columns": {"user": "instruction", "assistant": "response"},
            **config,
        },
    }


def test_paper_recipe_plans_offline_and_lists_every_step(tmp_path: Path) -> None:
    result = hala(
        "run",
        "recipes/hala-paper.yaml",
        "--dry-run",
        "--store",
        str(tmp_path / "store"),
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    steps = yaml.safe_load((REPO / "recipes" / "hala-paper.yaml").read_text())["steps"]
    assert len(steps) >= 30
    for name in steps:
        assert f"\n{name} " in result.stdout, f"step {name} missing from the plan"
    # the paper's facts are in the recipe: first 405K OpenOrca rows, slerp t=0.5, the four bases, six
    # benchmarks
    assert steps["prepare-openorca"]["config"]["max_rows"] == 405_000
    assert steps["quantize-teacher"]["inputs"]["model"] == "hub:CohereLabs/command-a-translate-08-2025"
    assert steps["quantize-teacher"]["config"]["scheme"] == "FP8_DYNAMIC"
    assert {steps[f"merge-hala-{s}"]["config"]["t"] for s in ("350m", "700m", "1.2b", "9b")} == {0.5}
    assert steps["train-hala-9b"]["inputs"]["model"] == "hub:QCRI/Fanar-1-9B-Instruct"
    assert len(steps["evaluate-hala-9b"]["config"]["tasks"]) == 6
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("_MANIFEST.json"))


def test_tiny_recipe_has_the_paper_steps_of_every_built_stage() -> None:
    """Every paper step that could run (its stage and its upstream steps' stages exist) is in tiny.yaml."""
    paper = recipe_mod.load(REPO / "recipes" / "hala-paper.yaml", check_paths=False)
    tiny = recipe_mod.load(REPO / "recipes" / "tiny.yaml")

    def runnable(name: str) -> bool:
        step = paper.steps[name]
        return step.spec is not None and all(runnable(up) for up in step.upstream)

    built = {name for name in paper.steps if runnable(name) and paper.steps[name].enabled}
    assert built <= set(tiny.steps), (
        f"steps of built stages missing from tiny.yaml: {sorted(built - set(tiny.steps))}"
    )
    # a step the paper does not have must say why it exists ("tiny only - ...", e.g. seed pairs for the
    # student)
    extra = set(tiny.steps) - set(paper.steps)
    assert all((tiny.steps[n].description or "").startswith("tiny only") for n in extra), sorted(extra)
    for name in built:
        assert tiny.steps[name].stage == paper.steps[name].stage


def test_misspelled_config_key_is_exit_2_naming_step_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": _prepare(max_row=3)})
    result = hala("run", str(path))
    assert result.returncode == 2
    assert "step 'prepare-lamini'" in result.stderr
    assert "unknown key 'max_row'" in result.stderr
    assert "did you mean 'max_rows'" in result.stderr
    assert "allowed keys for stage 'prepare'" in result.stderr and "drop_code" in result.stderr


def test_unknown_step_and_recipe_keys_are_named(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": {**_prepare(), "shard": 2}}, storre="x")
    with pytest.raises(ConfigError) as err:
        recipe_mod.load(path)
    text = str(err.value)
    assert "the recipe: unknown key 'storre' (did you mean 'store'?)" in text
    assert "step 'prepare-lamini': unknown key 'shard' (did you mean 'shards'?)" in text


def test_wrong_type_and_enum_name_the_key(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": _prepare(max_rows="ten")})
    with pytest.raises(ConfigError, match=r"config key 'max_rows': 'ten' is not one of the accepted types"):
        recipe_mod.load(path)
    path = write_recipe(tmp_path, {"prepare-lamini": {**_prepare(), "config": {"format": "csv-ish"}}})
    with pytest.raises(ConfigError, match=r"config key 'format': 'csv-ish' is not one of \['alpaca'"):
        recipe_mod.load(path)


def test_missing_input_misspelt_step_and_missing_required_input(tmp_path: Path) -> None:
    steps = {
        "prepare-lamini": _prepare(),
        "prepare-copy": {
            "stage": "prepare",
            "inputs": {"source": "prepare-lamnii"},
            "config": {"format": "messages"},
        },
        "prepare-none": {"stage": "prepare", "config": {"format": "messages"}},
    }
    result = hala("run", str(write_recipe(tmp_path, steps)))
    assert result.returncode == 2
    assert (
        "step 'prepare-copy': input 'source': 'prepare-lamnii' is neither a step of this recipe (did you "
        "mean 'prepare-lamini'?)" in result.stderr
    )
    assert "step 'prepare-none': missing input 'source'" in result.stderr


def test_unknown_output_and_unknown_input_name(tmp_path: Path) -> None:
    steps = {
        "prepare-lamini": _prepare(),
        "prepare-copy": {
            "stage": "prepare",
            "inputs": {"source": "prepare-lamini.conversations", "extra": str(LAMINI)},
            "config": {"format": "messages"},
        },
    }
    with pytest.raises(ConfigError) as err:
        recipe_mod.load(write_recipe(tmp_path, steps))
    assert (
        "names output 'conversations' of step 'prepare-lamini', which has outputs: data, quarantine"
        in str(err.value)
    )
    assert "unknown input 'extra'" in str(err.value)


def test_cycle_is_exit_2_and_shows_the_cycle(tmp_path: Path) -> None:
    steps = {
        "prepare-a": {
            "stage": "prepare",
            "inputs": {"source": "prepare-b"},
            "config": {"format": "messages"},
        },
        "prepare-b": {
            "stage": "prepare",
            "inputs": {"source": "prepare-a"},
            "config": {"format": "messages"},
        },
    }
    result = hala("steps", str(write_recipe(tmp_path, steps)))
    assert result.returncode == 2
    assert "cycle: prepare-a -> prepare-b -> prepare-a" in result.stderr


def test_steps_come_in_dependency_order(tmp_path: Path) -> None:
    steps = {  # declared downstream first
        "prepare-copy": {
            "stage": "prepare",
            "inputs": {"source": "prepare-lamini"},
            "config": {"format": "messages"},
        },
        "prepare-lamini": _prepare(),
    }
    r = recipe_mod.load(write_recipe(tmp_path, steps))
    assert r.order == ["prepare-lamini", "prepare-copy"]
    assert r.steps["prepare-copy"].inputs["source"].output == "data"


def test_set_overrides_with_type_checking(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": _prepare()})
    r = recipe_mod.load(
        path, overrides=["prepare-lamini.max_rows=2", "prepare-lamini.columns.system=instruction_source"]
    )
    assert r.steps["prepare-lamini"].config["max_rows"] == 2
    assert r.steps["prepare-lamini"].config["columns"]["system"] == "instruction_source"
    result = hala("run", str(path), "--set", "prepare-lamini.max_rows=abc")
    assert result.returncode == 2
    assert "config key 'max_rows' (from --set): 'abc'" in result.stderr
    result = hala("run", str(path), "--set", "prepare-lamni.max_rows=2")
    assert (
        result.returncode == 2
        and "no step 'prepare-lamni'" in result.stderr
        and "did you mean 'prepare-lamini'" in result.stderr
    )


def test_set_input_is_relative_to_the_current_directory(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "recipes", {"prepare-lamini": _prepare()})
    r = recipe_mod.load(path, overrides=["prepare-lamini.inputs.source=recipes/samples/dahoas.jsonl"])
    assert r.steps["prepare-lamini"].inputs["source"].uri == str(
        REPO / "recipes" / "samples" / "dahoas.jsonl"
    )


def test_config_defaults_do_not_change_the_config_hash(tmp_path: Path) -> None:
    bare = recipe_mod.load(write_recipe(tmp_path / "a", {"prepare-lamini": _prepare()}))
    explicit = recipe_mod.load(
        write_recipe(tmp_path / "b", {"prepare-lamini": _prepare(dedup=True, drop_code=False)})
    )
    assert bare.steps["prepare-lamini"].config_hash() == explicit.steps["prepare-lamini"].config_hash()
    other = recipe_mod.load(write_recipe(tmp_path / "c", {"prepare-lamini": _prepare(dedup=False)}))
    assert other.steps["prepare-lamini"].config_hash() != bare.steps["prepare-lamini"].config_hash()


def test_step_names_with_dots_resolve(tmp_path: Path) -> None:
    steps = {
        "prepare-hala-1.2b": _prepare(),
        "prepare-copy": {
            "stage": "prepare",
            "inputs": {"source": "prepare-hala-1.2b.quarantine"},
            "config": {"format": "messages"},
        },
    }
    r = recipe_mod.load(write_recipe(tmp_path, steps))
    ref = r.steps["prepare-copy"].inputs["source"]
    assert (ref.kind, ref.step, ref.output) == ("step", "prepare-hala-1.2b", "quarantine")


def test_external_source_kinds(tmp_path: Path) -> None:
    steps = {
        "prepare-hub": {
            "stage": "prepare",
            "inputs": {"source": "hub:Open-Orca/OpenOrca@abc123"},
            "config": {"format": "openorca"},
        },
        "prepare-url": {
            "stage": "prepare",
            "inputs": {"source": "s3://bucket/data.jsonl"},
            "config": {"format": "messages"},
        },
    }
    r = recipe_mod.load(write_recipe(tmp_path, steps))
    hub = r.steps["prepare-hub"].inputs["source"]
    assert (hub.kind, hub.uri, hub.revision) == ("hub", "Open-Orca/OpenOrca", "abc123")
    assert r.steps["prepare-url"].inputs["source"].kind == "url"
    with pytest.raises(ConfigError, match="unknown tiny model 'teachr' \\(did you mean 'teacher'\\?\\)"):
        recipe_mod.parse_ref("model", "tiny:teachr", {}, tmp_path)
    with pytest.raises(ConfigError, match="must look like 'org/name'"):
        recipe_mod.parse_ref("model", "hub:just-a-name", {}, tmp_path)


def test_a_step_whose_stage_does_not_exist_plans_but_does_not_run(tmp_path: Path) -> None:
    steps = {
        "prepare-lamini": _prepare(),
        "distill-teacher": {
            "stage": "distill",
            "inputs": {"model": "hub:CohereLabs/command-a-translate-08-2025"},
        },
    }
    path = write_recipe(tmp_path, steps)
    plan = hala("run", str(path), "--dry-run")
    assert plan.returncode == 0 and "stage missing" in plan.stdout
    result = hala("run", str(path))
    assert result.returncode == 2
    assert "stage(s) distill do not exist yet" in result.stderr and "distill-teacher" in result.stderr
    assert not (tmp_path / "store" / "r" / "prepare-lamini").exists(), (
        "nothing runs when a selected stage is missing"
    )


def test_step_names_say_their_stage_and_tiny_models_need_pairs(tmp_path: Path) -> None:
    steps = {
        "translate-lamini": _prepare(),
        "prepare-x": {
            "stage": "prepare",
            "inputs": {"source": "tiny:teacher"},
            "config": {"format": "messages"},
        },
    }
    with pytest.raises(ConfigError) as err:
        recipe_mod.load(write_recipe(tmp_path, steps))
    assert "step 'translate-lamini' runs stage 'prepare': name it prepare-<subject>" in str(err.value)
    assert "no tiny_models.pairs" in str(err.value)


SHARED = """\
name: t
store: {store}
run: r
steps:
  prepare-a:
    stage: prepare
    inputs: &src {{source: {src}}}
    config: &cfg
      format: columns
      columns: {{user: instruction, assistant: response}}
      max_rows: 5
  prepare-b:
    stage: prepare
    inputs: *src
    config: *cfg
  prepare-c:
    stage: prepare
    inputs: {{<<: *src}}
    config: {{<<: *cfg, max_rows: 7}}
"""


def _shared_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        SHARED.format(store=tmp_path / "store", src=REPO / "recipes" / "samples" / "lamini.jsonl")
    )
    return path


def test_an_override_changes_one_step_even_where_the_recipe_shares_config_through_anchors(tmp_path):
    path = _shared_recipe(tmp_path)
    recipe = recipe_mod.load(
        path,
        overrides=[
            "prepare-a.max_rows=2",
            "prepare-a.columns.user=prompt",
            "prepare-b.inputs.source=" + str(REPO / "recipes" / "samples" / "dahoas.jsonl"),
        ],
    )
    steps = recipe.steps
    assert (
        steps["prepare-a"].config["max_rows"] == 2
        and steps["prepare-a"].config["columns"]["user"] == "prompt"
    )
    assert (
        steps["prepare-b"].config["max_rows"] == 5
        and steps["prepare-b"].config["columns"]["user"] == "instruction"
    )
    assert (
        steps["prepare-c"].config["max_rows"] == 7
        and steps["prepare-c"].config["columns"]["user"] == "instruction"
    )
    assert steps["prepare-b"].inputs["source"].uri.endswith("dahoas.jsonl")
    assert steps["prepare-a"].inputs["source"].uri.endswith("lamini.jsonl") and steps["prepare-c"].inputs[
        "source"
    ].uri.endswith("lamini.jsonl")
    assert steps["prepare-a"].config is not steps["prepare-b"].config


def test_the_tiny_recipe_plans_one_translation_again_when_one_is_overridden():
    out = hala(
        "run",
        "recipes/tiny.yaml",
        "--dry-run",
        "--json",
        "--store",
        "/nonexistent-store-for-the-plan",
        "--set",
        "translate-lamini.chunk_rows=8",
    )
    assert out.returncode == 0, out.stderr
    recipe = recipe_mod.load(REPO / "recipes" / "tiny.yaml", overrides=["translate-lamini.chunk_rows=8"])
    students = [n for n in recipe.steps if n.startswith("translate-") and n != "translate-openorca-teacher"]
    assert [n for n in students if recipe.steps[n].config["chunk_rows"] == 8] == ["translate-lamini"]
    bad = hala("run", "recipes/tiny.yaml", "--dry-run", "--set", "translate-lamini.chunk_rows=abc")
    assert bad.returncode == 2
    # one problem, under its own step
    assert "translate-lamini" in bad.stderr and "problems" not in bad.stderr
    assert "translate-openorca:" not in bad.stderr


def test_the_dry_run_plans_only_the_overridden_step_of_steps_sharing_an_anchor(tmp_path):
    path = _shared_recipe(tmp_path)
    first = hala("run", str(path))
    assert first.returncode == 0, first.stderr + first.stdout[-2000:]
    out = hala("run", str(path), "--dry-run", "--json", "--set", "prepare-a.max_rows=2")
    assert out.returncode == 0, out.stderr
    states = {s["step"]: s["state"] for s in json.loads(out.stdout)["steps"]}
    assert states == {"prepare-a": "will run", "prepare-b": "cached", "prepare-c": "cached"}


def test_an_override_file_sets_many_keys_validated_like_set_and_reaches_the_step_commands(tmp_path):
    path = _shared_recipe(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_bytes(
        (REPO / "recipes" / "samples" / "lamini.jsonl").read_bytes()
    )
    overrides = tmp_path / "overrides.yaml"
    # relative to the file, not to the cwd
    overrides.write_text(
        "prepare-a.max_rows: 3\nprepare-b.columns: {user: prompt, assistant: response}\n"
        "prepare-c.inputs.source: data/mine.jsonl\n"
    )
    out = hala(
        "steps",
        str(path),
        "--set-file",
        str(overrides),
        "--set",
        "prepare-a.max_rows=4",
        "--config",
        "prepare-a",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    # --set wins over the file
    assert shown["config"]["max_rows"] == 4 and shown["from"]["max_rows"] == "--set"
    assert shown["from"]["format"] == "recipe" and shown["from"]["dedup"] == "default"
    b = json.loads(
        hala("steps", str(path), "--set-file", str(overrides), "--config", "prepare-b", "--json").stdout
    )
    assert (
        b["config"]["columns"]["user"] == "prompt" and b["from"]["columns.user"] == f"--set-file {overrides}"
    )
    recipe = recipe_mod.load(path, overrides=recipe_mod.read_set_file(overrides)[0])
    assert recipe.steps["prepare-c"].inputs["source"].uri == str(tmp_path / "data" / "mine.jsonl")
    assert (
        recipe.steps["prepare-a"].config["max_rows"] == 3
        and recipe.steps["prepare-b"].config["max_rows"] == 5
    )
    # the items reach every step process as --set, so that a container or a Job sees the same recipe
    from hala.ops import runner

    cmd = runner.step_command(recipe, recipe.steps["prepare-c"])
    assert f"prepare-c.inputs.source={tmp_path / 'data' / 'mine.jsonl'}" in cmd
    # wrong keys and values name the file, the step and the key
    overrides.write_text("prepare-a.max_rows: many\n")
    bad = hala("run", str(path), "--dry-run", "--set-file", str(overrides))
    assert (
        bad.returncode == 2
        and "prepare-a" in bad.stderr
        and "max_rows" in bad.stderr
        and "--set-file" in bad.stderr
    )
    overrides.write_text("max_rows: 3\n")
    bad = hala("run", str(path), "--dry-run", "--set-file", str(overrides))
    assert bad.returncode == 2 and "STEP.KEY" in bad.stderr and str(overrides) in bad.stderr
