"""Served models in a recipe: how the recipe links them to their steps, what compose and Kubernetes get for
them (a service with a healthcheck; a Deployment and a Service, strict-valid, the clients' Jobs on CPU), the
conductor scaling a Deployment up for its first user and to zero after the last, and no key in any
rendering."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hala.contract import recipe as recipe_mod
from hala.contract.errors import ConfigError
from hala.ops import compose, conductor, k8s, kubejobs, manifests
from hala.ops.drive import Outcome
from helpers import REPO, hala, write_recipe

PAPER = REPO / "recipes" / "hala-paper.yaml"
SWITCH = REPO / "recipes" / "switches" / "teacher-served.yaml"
TRANSLATE = REPO / "recipes" / "translate-hala.yaml"
K8S_VERSION = "1.37.0"


def served_recipe(folder: Path, **served: Any) -> Path:
    use = {"endpoint": {"served": "translator"}}
    return write_recipe(
        folder,
        {
            "translate-a": {"stage": "translate", "inputs": {"data": "data-a"}, "config": use},
            "judge-b": {"stage": "judge", "inputs": {"data": "translate-a.pairs"}, "config": use},
            "translate-c": {"stage": "translate", "inputs": {"data": "data-c", "model": "tiny:translator"}},
        },
        tiny_models={"pairs": "pairs.tsv"},
        served={"translator": {"model": "tiny:translator", "port": 8011, **served}},
    )


def test_a_served_model_is_linked_to_the_steps_that_use_it(tmp_path: Path) -> None:
    r = recipe_mod.load(served_recipe(tmp_path), check_paths=False)
    entry = r.served["translator"]
    assert entry.users == ["translate-a", "judge-b"]  # in run order; translate-c loads its own
    assert r.steps["translate-a"].inputs["model"].raw == "tiny:translator"  # the served model's tokenizer
    assert r.steps["judge-b"].upstream == ["translate-a"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"translate-a.endpoint": {"served": "teacher"}}, "endpoint.served 'teacher' is not in the recipe"),
        ({"translate-a.inputs.model": "tiny:judge"}, "drop the step's model input"),
        ({"translate-a.endpoint": {"served": "translator", "base_url": "http://x:1/v1"}}, "base_url"),
        ({"translate-a.engine": "vllm"}, "use engine endpoint"),
    ],
)
def test_a_wrong_use_of_a_served_model_is_a_config_error_that_says_how_to_fix_it(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in change.items()]
    with pytest.raises(ConfigError, match=message):
        recipe_mod.load(served_recipe(tmp_path), overrides=sets, check_paths=False)


def test_served_entries_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="served 'translator': unknown key 'gpu'"):
        recipe_mod.load(served_recipe(tmp_path, gpu=1), check_paths=False)
    body = yaml.safe_load(served_recipe(tmp_path).read_text())
    body["served"]["judge"] = {"model": "tiny:judge", "port": 8011}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match="share a port"):
        recipe_mod.load(tmp_path / "two.yaml", check_paths=False)


def test_compose_gives_the_served_model_a_healthchecked_service_its_users_wait_for(tmp_path: Path) -> None:
    folder = REPO / "recipes"  # containers read recipes from recipes/
    path = served_recipe(tmp_path)
    inside = folder / "_test-served.yaml"
    inside.write_text(path.read_text())
    try:
        r = recipe_mod.load(inside, check_paths=False)
        spec = compose.render(r, "cuda")
    finally:
        inside.unlink()
    services = spec["services"]
    server = services["served-translator"]
    assert server["entrypoint"] == ["python", "-m", "hala.ops.served"]
    assert server["command"][:4] == [
        "--recipe",
        "/opt/hala/recipes/_test-served.yaml",
        "--served",
        "translator",
    ]
    assert "--until-done" in server["command"]  # compose has nothing else that would stop it
    assert "127.0.0.1:8011/v1/models" in " ".join(server["healthcheck"]["test"])
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    for user in ("translate-a", "judge-b"):
        s = services[user]
        assert s["depends_on"]["served-translator"] == {"condition": "service_healthy"}
        assert s["environment"]["HALA_SERVED_URL_TRANSLATOR"] == "http://127.0.0.1:8011/v1"
        assert "deploy" not in s  # clients: no GPU
    assert "served-translator" not in services["translate-c"].get("depends_on", {})
    assert "deploy" in services["translate-c"]


def test_kubernetes_gets_a_deployment_and_a_service_valid_and_cpu_jobs_that_call_it() -> None:
    r = recipe_mod.load(TRANSLATE, check_paths=False)
    files = manifests.render(r, "cuda")
    objs = {
        (o["kind"], o["metadata"]["name"]): o
        for f, os_ in files.items()
        if f != "kustomization.yaml"
        for o in os_
    }
    deployment = objs[("Deployment", "served-translate-hala-translator")]
    service = objs[("Service", "served-translate-hala-translator")]
    for obj in (deployment, service):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert (
        deployment["spec"]["replicas"] == 0
        and deployment["metadata"]["annotations"]["hala.dev/replicas"] == "2"
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    job = objs[("Job", "translate-hala-translate-data")]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]  # the shards are CPU clients
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (
        env["HALA_SERVED_URL_TRANSLATOR"]
        == "http://served-translate-hala-translator.hala-translate.svc:8000/v1"
    )
    rules = objs[("Role", k8s.CONDUCTOR)]["rules"]
    assert {
        "apiGroups": ["apps"],
        "resources": ["deployments/scale"],
        "verbs": ["get", "patch", "update"],
    } in rules
    assert "served/translator.yaml" in files["kustomization.yaml"][0]["resources"]


def test_the_paper_teacher_served_by_the_switch_is_an_fp8_deployment_and_its_shards_lose_their_gpus() -> None:
    sets, _ = recipe_mod.read_set_file(SWITCH)
    plain = manifests.render(recipe_mod.load(PAPER, check_paths=False), "cuda")
    assert not [f for f in plain if f.startswith("served/")]  # nobody uses it: nothing deployed
    files = manifests.render(recipe_mod.load(PAPER, overrides=sets, check_paths=False), "cuda")
    (deployment, _) = files["served/teacher.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4  # tensor_parallel_size
    assert pod["affinity"] == k8s.fp8_affinity()  # an FP8 teacher on compute capability >= 8.9
    job = next(o for o in files["jobs/05-translate-openorca-teacher.yaml"])
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits and job["spec"]["completions"] == 8
    out = hala("run", str(PAPER), "--set-file", str(SWITCH), "--dry-run", "--store", "/tmp/hala-dry-served")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "served models (1):" in out.stdout
        and "translate-openorca-teacher" in out.stdout.split("served models")[1]
    )
    # the plan says what would be served, for whom, and nothing for a step left out by --only
    plan = hala(
        "run", str(PAPER), "--set-file", str(SWITCH), "--dry-run", "--json", "--store", "/tmp/hala-dry-served"
    )
    planned = json.loads(plan.stdout)  # one document: the unpinned hub inputs are in it, not logged beside it
    assert {w["repo"] for w in planned["warnings"]} >= {"Open-Orca/OpenOrca"}
    (teacher,) = planned["served"]
    assert teacher["served"] == "teacher" and teacher["users"] == ["translate-openorca-teacher"]
    assert teacher["model"].startswith("quantize-teacher") and teacher["server"] == "vllm (OpenAI server)"
    only = hala(
        "run",
        str(PAPER),
        "--set-file",
        str(SWITCH),
        "--dry-run",
        "--json",
        "--only",
        "prepare-openorca",
        "--store",
        "/tmp/hala-dry-served",
    )
    assert json.loads(only.stdout)["served"] == []


def test_the_conductor_scales_a_served_model_up_for_its_first_user_and_to_zero_after_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the official client against the API stand-in: the Deployment's scale subresource."""
    from kubeapi import KubeAPI

    r = recipe_mod.load(served_recipe(tmp_path, replicas=3), check_paths=False)
    with KubeAPI() as api:
        (tmp_path / "kubeconfig").write_text(api.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        jobs = kubejobs.KubeJobs("hala")
        executor = conductor.JobExecutor(
            r, None, jobs, _Log(), reapplied=False, job_args={}, resync_seconds=1, max_polls=None
        )
        executor.selected = set(r.steps)
        executor.start(r.steps["translate-a"], None, False)
        executor.start(r.steps["judge-b"], None, False)  # already up: no second scale
        executor.ended(Outcome("translate-a", "done"))
        assert api.scales == [("served-r-translator", 3)]
        executor.ended(Outcome("translate-c", "done"))
        executor.ended(Outcome("judge-b", "failed", exit_code=3))
        assert api.scales == [("served-r-translator", 3), ("served-r-translator", 0)]


class _Log:
    def info(self, *args: Any, **kw: Any) -> None:
        pass

    warning = info


def test_no_key_value_in_any_rendering(tmp_path: Path) -> None:
    """A step with an endpoint of its own and api_key_env: the key's value, set in the environment of the
    renderer, is in no rendered file (compose, Kubernetes, Argo); the variable's name is."""
    secret = "sk-render-secret-0b7e61"
    body = yaml.safe_load(TRANSLATE.read_text())
    del body["served"]
    body["steps"]["translate-data"]["inputs"]["model"] = "hub:hammh0a/Hala-1.2B-EN-AR-Translator"  # tokenizer
    body["steps"]["translate-data"]["config"]["endpoint"] = {
        "base_url": "https://api.example.com/v1",
        "model": "hala-translator",
        "api_key_env": "HALA_TRANSLATOR_KEY",
    }
    path = REPO / "recipes" / "_test-keyed.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    try:
        env = {"HALA_TRANSLATOR_KEY": secret}
        for args in (
            ["render", "compose", str(path), "-o", str(tmp_path / "compose.yaml")],
            ["render", "k8s", str(path), "-o", str(tmp_path / "k8s")],
            ["render", "argo", str(path), "-o", str(tmp_path / "argo")],
        ):
            out = hala(*args, env=env)
            assert out.returncode == 0, out.stderr[-2000:]
            assert secret not in out.stdout + out.stderr
    finally:
        path.unlink()
    texts = [p.read_text() for p in tmp_path.rglob("*.yaml")]
    assert texts and not any(secret in t for t in texts)
    assert any("HALA_TRANSLATOR_KEY" in t for t in texts)  # the name travels (in the recipe's ConfigMap)
    assert os.environ.get("HALA_TRANSLATOR_KEY") is None
