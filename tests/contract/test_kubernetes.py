"""Kubernetes: the rendered manifests (validity, policy, drift) and the conductor's decisions.

No cluster runs here. The manifests are checked with kubernetes-validate --strict (its schemas ship with
it) and by policy; the conductor runs for real against an in-memory stand-in of the Jobs API calls it makes
(FakeCluster), and through the official client against a stand-in of the API server that is its Job controller
too (tests/_lib/kubeapi.py): both run each Job's container command as a local process, index by index, with
JOB_COMPLETION_INDEX set the way an Indexed Job sets it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hala.contract import recipe as recipe_mod
from hala.ops import conductor, k8s, kubejobs, manifests
from hala.ops.resources import needs
from helpers import REPO, hala, write_recipe

FIXTURES = Path(__file__).resolve().parent / "fixture_stages"
TINY = REPO / "recipes" / "tiny.yaml"
PAPER = REPO / "recipes" / "hala-paper.yaml"
TRANSLATE = REPO / "recipes" / "translate-hala.yaml"  # a served model: a Deployment and a Service
K8S_VERSION = "1.37.0"


def _load(path: Path) -> recipe_mod.Recipe:
    return recipe_mod.load(path, check_paths=False)


def _objects(files: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [o for name, objs in files.items() if name != "kustomization.yaml" for o in objs]


def _jobs(files: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [o for o in _objects(files) if o["kind"] == "Job"]


def _step_jobs(files: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The step Jobs by step, without the conductor and the gather Jobs."""
    return {
        j["metadata"]["labels"]["hala.dev/step"]: j
        for j in _jobs(files)
        if j["metadata"]["labels"]["hala.dev/stage"] not in ("gather", "cli")
    }


# ------------------------------------------------------------------ rendered manifests


@pytest.mark.parametrize(
    "recipe,variant,folder",
    [(TINY, "cpu", "tiny"), (PAPER, "cuda", "hala-paper"), (TRANSLATE, "cuda", "translate-hala")],
)
def test_checked_in_manifests_equal_the_rendering(tmp_path, recipe, variant, folder):
    out = hala(
        "render", "k8s", str(recipe.relative_to(REPO)), "--variant", variant, "-o", str(tmp_path / folder)
    )
    assert out.returncode == 0, out.stderr
    rendered = {p.relative_to(tmp_path / folder): p.read_text() for p in (tmp_path / folder).rglob("*.yaml")}
    # argo/ and kueue/ beside them are other renderings (tests/contract/test_argo.py)
    checked_in = {
        p.relative_to(REPO / "manifests" / folder): p.read_text()
        for p in (REPO / "manifests" / folder).rglob("*.yaml")
        if p.relative_to(REPO / "manifests" / folder).parts[0] not in ("argo", "kueue")
    }
    assert set(rendered) == set(checked_in), (
        f"run `hala render k8s {recipe.relative_to(REPO)} --variant {variant} -o manifests/{folder}`"
    )
    for name, text in rendered.items():
        assert checked_in[name] == text.replace(str(tmp_path / folder), f"manifests/{folder}"), name


@pytest.mark.parametrize("recipe,variant", [(TINY, "cpu"), (PAPER, "cuda"), (TRANSLATE, "cuda")])
def test_every_manifest_passes_strict_schema_validation(recipe, variant):
    objects = _objects(manifests.render(_load(recipe), variant))
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "PersistentVolumeClaim",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Job",
    } <= kinds
    for obj in objects:
        # raises ValidationError on any unknown field
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_misspelt_field():
    job = _jobs(manifests.render(_load(PAPER), "cuda"))[0]
    job["spec"]["backofLimit"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_paper_jobs_one_per_enabled_step_with_the_step_command():
    recipe = _load(PAPER)
    files = manifests.render(recipe, "cuda")
    jobs = {j["metadata"]["name"]: j for j in _jobs(files)}
    enabled = [s for s in recipe.steps.values() if s.enabled]
    sharded = [s for s in enabled if s.shards > 1]
    assert len(jobs) == len(enabled) + len(sharded) + 1 and f"hala-conductor-{recipe.run}" in jobs
    for step in sharded:  # without the conductor: the step's Indexed Job, then its gather Job
        gather = jobs[k8s.k8s_name(f"{recipe.run}-gather-{step.name}")]["spec"]["template"]["spec"][
            "containers"
        ][0]
        assert gather["args"][:3] == ["gather", "/opt/hala/recipes/hala-paper.yaml", step.name]
        assert gather["image"] == "local/hala-cli:dev-cuda"
    for step in enabled:
        job = jobs[k8s.job_name(recipe, step)]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][:1] == [step.stage] and step.name in container["args"]
        assert container["image"] == f"local/hala-{step.spec.env}:dev-cuda"
    # only the base objects and the conductor are applied by `kubectl apply -k`; step Jobs are the conductor's
    assert files["kustomization.yaml"][0]["resources"] == [
        "namespace.yaml",
        "storage.yaml",
        "recipe.yaml",
        "rbac.yaml",
        "conductor.yaml",
    ]
    assert all(len(name) <= 63 and name.replace("-", "").isalnum() for name in jobs)


def test_every_container_runs_as_non_root_with_limits_and_no_privilege():
    for recipe, variant in [(PAPER, "cuda"), (TINY, "cpu")]:
        for job in _jobs(manifests.render(_load(recipe), variant)):
            pod = job["spec"]["template"]["spec"]
            assert (
                pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
            )
            assert pod["restartPolicy"] == "Never" and job["spec"]["ttlSecondsAfterFinished"] > 0
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert sc["readOnlyRootFilesystem"] is True
                writable = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", "/home/app"} <= writable  # what the stages write besides the store
                assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
                assert c["resources"]["requests"] == c["resources"]["limits"]


def test_gpu_jobs_request_their_gpus_and_tolerate_the_taint():
    recipe = _load(PAPER)
    jobs = _step_jobs(manifests.render(recipe, "cuda"))
    for step in (s for s in recipe.steps.values() if s.enabled):
        pod = jobs[k8s.k8s_name(step.name)]["spec"]["template"]["spec"]
        res = pod["containers"][0]["resources"]
        gpus = needs(recipe, step).gpus
        if gpus:
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
            shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
            assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        else:
            assert "nvidia.com/gpu" not in res["limits"] and "tolerations" not in pod
    assert (
        jobs["translate-openorca-teacher"]["spec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ]["nvidia.com/gpu"]
        == 4
    )
    assert (
        jobs["train-hala-9b"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"
        ]
        == 8
    )


def _capability_ok(labels: dict[str, str], affinity: dict[str, Any]) -> bool:
    """Evaluate a required node affinity against a node's labels (terms ORed, expressions ANDed)."""

    def match(expr: dict[str, Any]) -> bool:
        value = labels.get(expr["key"])
        if value is None:
            return False
        if expr["operator"] == "In":
            return value in expr["values"]
        if expr["operator"] == "Gt":
            return int(value) > int(expr["values"][0])
        raise AssertionError(expr)

    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return any(all(match(e) for e in t["matchExpressions"]) for t in terms)


def test_fp8_steps_select_nodes_by_compute_capability():
    recipe = _load(PAPER)
    jobs = _step_jobs(manifests.render(recipe, "cuda"))
    fp8 = {name for name, job in jobs.items() if "affinity" in job["spec"]["template"]["spec"]}
    assert fp8 == {"quantize-teacher", "translate-openorca-teacher", "evaluate-fp8-teacher"}
    text = json.dumps([jobs[n] for n in fp8])
    assert "gpu.family" not in text  # some GFD versions label Ada 'ampere'
    affinity = jobs["translate-openorca-teacher"]["spec"]["template"]["spec"]["affinity"]

    def gpu(major: int, minor: int) -> dict[str, str]:
        return {"nvidia.com/gpu.compute.major": str(major), "nvidia.com/gpu.compute.minor": str(minor)}

    assert _capability_ok(gpu(9, 0), affinity)  # H100
    assert _capability_ok(gpu(8, 9), affinity)  # L40S, RTX 4090 (Ada)
    assert _capability_ok(gpu(10, 0), affinity)  # B200
    assert _capability_ok(gpu(12, 0), affinity)  # RTX 50 series
    assert not _capability_ok(gpu(8, 0), affinity)  # A100: no FP8 tensor cores
    assert not _capability_ok(gpu(8, 6), affinity)  # A10, RTX 3090
    assert not _capability_ok(gpu(7, 5), affinity)  # T4
    assert not _capability_ok({}, affinity)  # a node without GPU Feature Discovery labels


def test_sharded_steps_are_indexed_jobs_with_per_index_retries_and_the_failure_policy():
    recipe = _load(PAPER)
    jobs = _step_jobs(manifests.render(recipe, "cuda"))
    sharded = [s for s in recipe.steps.values() if s.enabled and s.shards > 1]
    assert {s.stage for s in sharded} == {"translate", "judge"}
    for step in sharded:
        spec = jobs[k8s.k8s_name(step.name)]["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == step.shards
        assert (
            spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0 and "backoffLimit" not in spec
        )
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "FailIndex",
            "onExitCodes": {"containerName": "step", "operator": "In", "values": [2, 3]},
        } in rules
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    for name, job in jobs.items():
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert any(r["action"] == "Ignore" for r in rules), name  # preemption never counts as a failure


def test_no_secret_in_any_manifest_and_the_token_comes_from_an_optional_secret():
    for recipe, variant in [(PAPER, "cuda"), (TINY, "cpu")]:
        objects = _objects(manifests.render(_load(recipe), variant))
        assert not [o for o in objects if o["kind"] == "Secret"]
        text = yaml.safe_dump_all(objects)
        assert "hf_" not in text.replace("hala-hf-token", "")
        for job in (o for o in objects if o["kind"] == "Job"):
            env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["HF_TOKEN"] == {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "hala-hf-token", "key": "token", "optional": True}},
            }


def test_conductor_rbac_is_limited_to_jobs_and_pods_of_its_namespace():
    files = manifests.render(_load(PAPER), "cuda")
    rbac = {o["kind"]: o for o in files["rbac.yaml"]}
    assert rbac["Role"]["metadata"]["namespace"] == "hala-paper"
    assert rbac["Role"]["rules"] == [
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["create", "get", "list", "watch", "delete"],
        },
        {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
    ]
    assert "ClusterRole" not in {o["kind"] for o in _objects(files)}
    conductor = files["conductor.yaml"][0]
    pod = conductor["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "hala-conductor"
    assert pod["containers"][0]["args"][:4] == ["run", "/opt/hala/recipes/hala-paper.yaml", "--runner", "k8s"]
    assert pod["containers"][0]["image"] == "local/hala-cli:dev-cuda"
    # step pods never talk to the API server
    assert all(
        j["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        for j in _jobs(files)
        if not j["metadata"]["name"].startswith("hala-conductor")
    )


def test_recipe_kubernetes_settings_reach_the_manifests(tmp_path):
    recipe = _load(PAPER)
    recipe.kubernetes = {
        "namespace": "team-a",
        "queue": "h100-queue",
        "storage": "2Ti",
        "storage_class": "cephfs",
        "pod_retries": 5,
    }
    files = manifests.render(recipe, "cuda", registry="ghcr.io/acme", tag="1.0")
    pvc = files["storage.yaml"][0]
    assert pvc["metadata"]["namespace"] == "team-a" and pvc["spec"]["storageClassName"] == "cephfs"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Ti" and pvc["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    job = files["jobs/04-quantize-teacher.yaml"][0]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100-queue"
    assert job["spec"]["backoffLimit"] == 5
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/hala-compress:1.0-cuda"
    assert "--registry" in files["conductor.yaml"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    bad = dict(yaml.safe_load(PAPER.read_text()), kubernetes={"namespace": "Team_A"})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = hala("steps", str(tmp_path / "bad.yaml"))
    assert out.returncode == 2 and "namespace" in out.stderr


def test_an_object_store_needs_no_volume_claim(tmp_path):
    recipe = _load(PAPER)
    recipe.store = "s3://bucket/hala"
    files = manifests.render(recipe, "cuda")
    assert "storage.yaml" not in files
    job = _jobs(files)[1]
    assert "--store" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "s3://bucket/hala" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [v for v in job["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    # every pod, the conductor's included, takes the store's credentials and endpoint from the optional Secret
    conductor = files["conductor.yaml"][0]["spec"]["template"]["spec"]["containers"][0]
    assert conductor["args"][conductor["args"].index("--store") + 1] == "s3://bucket/hala"
    for pod in [conductor] + [j["spec"]["template"]["spec"]["containers"][0] for j in _jobs(files)]:
        assert {"secretRef": {"name": "hala-store-credentials", "optional": True}} in pod["envFrom"]
        assert not [m for m in pod.get("volumeMounts", []) if m["mountPath"] == "/store"]
    out = hala("render", "k8s", str(PAPER), "--store", "s3://bucket/hala", "-o", str(tmp_path / "m"))
    assert out.returncode == 0 and not (tmp_path / "m" / "storage.yaml").exists(), out.stderr


# ------------------------------------------------------------------ the conductor


class FakeCluster:
    """The three Jobs API calls the conductor makes, in memory, and a kubelet: on each poll it runs the pods
    of every unfinished Job as local processes (its container args through hala-stage, one per index) and sets
    the Job's Complete or Failed condition the way the Job controller would."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.created: list[tuple[int, str]] = []
        self.deleted: list[str] = []
        self.polls = 0
        self.paused = False
        self.pods: list[tuple[str, int | None, int]] = []

    # the API
    def create(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        if name in self.jobs:
            raise kubejobs.Conflict(name)
        self.jobs[name] = {**copy.deepcopy(job), "status": {}}
        self.created.append((self.polls, name))

    def get(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.jobs.get(name))

    def delete(self, name: str) -> None:
        self.jobs.pop(name, None)
        self.deleted.append(name)

    def list(self, selector: str) -> list[dict[str, Any]]:
        terms = dict(t.split("=", 1) for t in selector.split(","))
        return [
            copy.deepcopy(j)
            for j in self.jobs.values()
            if all(j["metadata"]["labels"].get(k) == v for k, v in terms.items())
        ]

    # the kubelet and the Job controller, between two looks of the conductor (KubeJobs.wait watches the real
    # API)
    def wait(self, _seconds: float = 0) -> None:
        self.polls += 1
        if self.paused:
            return
        for name, job in self.jobs.items():
            if job["status"].get("conditions"):
                continue
            spec = job["spec"]
            indexes = range(spec["completions"]) if spec.get("completionMode") == "Indexed" else [None]
            failed = []
            for i in indexes:
                env = {**os.environ, **({"JOB_COMPLETION_INDEX": str(i)} if i is not None else {})}
                args = spec["template"]["spec"]["containers"][0]["args"]
                code = subprocess.run(
                    [sys.executable, "-m", "hala.ops.launch", *args], env=env, capture_output=True, text=True
                ).returncode
                self.pods.append((name, i, code))
                if code:
                    failed.append((i, code))
            if failed:
                i, code = failed[0]
                job["status"]["conditions"] = [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "PodFailurePolicy",
                        "message": f"Container step for pod {name}-{i} failed with exit code {code}",
                    }
                ]
            else:
                job["status"]["conditions"] = [{"type": "Complete", "status": "True"}]


@pytest.fixture()
def echo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALA_STAGES_PATH", str(FIXTURES))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    )


def _dag(tmp_path: Path, **a_config: Any) -> recipe_mod.Recipe:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(12)))
    path = write_recipe(
        tmp_path,
        {
            "echo-a": {"stage": "echo", "shards": 3, "inputs": {"data": str(data)}, "config": a_config},
            "echo-b": {"stage": "echo", "inputs": {"data": str(data), "after": "echo-a"}},
            "echo-c": {"stage": "echo", "inputs": {"data": str(data)}},
        },
    )
    return recipe_mod.load(path)


def _conduct(recipe: recipe_mod.Recipe, cluster: FakeCluster, **kw: Any) -> int:
    return conductor.conduct(
        recipe,
        cluster,
        variant="cpu",
        resync_seconds=0,
        recipe_arg=str(recipe.path),
        store_arg=recipe.store,
        **kw,
    )


def test_conductor_creates_jobs_in_dag_order_once_inputs_are_committed(tmp_path, echo):
    recipe = _dag(tmp_path)
    cluster = FakeCluster()
    assert _conduct(recipe, cluster) == 0
    created = dict((name, poll) for poll, name in cluster.created)
    assert created["r-echo-a"] == created["r-echo-c"] == 0  # ready at once: created together
    assert created["r-echo-b"] > created["r-echo-a"]  # only once echo-a was gathered and committed
    # an Indexed Job, 3 pods
    assert sorted(i for name, i, _ in cluster.pods if name == "r-echo-a") == [0, 1, 2]
    store = Path(recipe.store)
    a = json.loads((store / "r" / "echo-a" / "_MANIFEST.json").read_text())
    assert a["shards"]["count"] == 3 and a["counts"]["rows_out"] == 12  # the conductor gathered it
    assert all((store / "r" / s / "_MANIFEST.json").exists() for s in ("echo-b", "echo-c"))
    assert json.loads((store / "r" / "_RUN.json").read_text())["runner"] == "k8s"
    job = cluster.jobs["r-echo-b"]
    assert (
        job["metadata"]["annotations"][k8s.FINGERPRINT]
        == json.loads((store / "r" / "echo-b" / "_MANIFEST.json").read_text())["fingerprint"]
    )

    # a second conductor finds every step committed: no Job at all
    again = FakeCluster()
    assert _conduct(recipe, again) == 0 and again.created == []


def test_conductor_stops_on_a_failed_job_with_its_reason(tmp_path, echo, capsys):
    recipe = _dag(tmp_path, misreport=True)  # echo-a's shards claim a row too many: exit 3, bad data
    cluster = FakeCluster()
    code = _conduct(recipe, cluster)
    assert code == 3
    out = "".join(capsys.readouterr())  # the summary says what failed on stderr, as the local runner does
    assert "step echo-a failed (exit 3)" in out and "failed with exit code 3" in out
    assert "r-echo-b" not in cluster.jobs  # its input never committed: never created, no pod waits
    assert not (Path(recipe.store) / "r" / "echo-a" / "_MANIFEST.json").exists()


def test_a_restarted_conductor_adopts_the_jobs_it_finds(tmp_path, echo):
    recipe = _dag(tmp_path)
    cluster = FakeCluster()
    cluster.paused = True  # pods pending: the first conductor dies while its Jobs run
    assert _conduct(recipe, cluster, max_polls=2) == 75
    assert sorted(name for _, name in cluster.created) == ["r-echo-a", "r-echo-c"]
    cluster.paused = False
    assert _conduct(recipe, cluster) == 0  # the replacement pod
    names = [name for _, name in cluster.created]
    # no duplicate Job
    assert sorted(names) == ["r-echo-a", "r-echo-b", "r-echo-c"] and len(names) == len(set(names))
    assert cluster.deleted == []


def test_a_job_left_from_another_config_is_replaced_not_adopted(tmp_path, echo):
    recipe = _dag(tmp_path)
    cluster = FakeCluster()
    stale = k8s.step_job(
        recipe, recipe.steps["echo-c"], "cpu", fingerprint="0" * 64, recipe_arg=str(recipe.path)
    )
    stale["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    cluster.jobs["r-echo-c"] = stale
    assert _conduct(recipe, cluster) == 0
    assert cluster.deleted == ["r-echo-c"] and ("r-echo-c" in [n for _, n in cluster.created])
    assert (Path(recipe.store) / "r" / "echo-c" / "_MANIFEST.json").exists()


def test_the_conductor_waits_on_the_watch_api_and_resyncs_after_a_dropped_history(
    tmp_path: Path, monkeypatch
) -> None:
    """KubeJobs.wait (what the conductor does between two looks at its Jobs) against a stand-in of the API
    server's Job list and watch (tests/_lib/kubeapi.py) through the official client: a change ends the wait at
    once, the next watch starts after the version seen, and a 410 Gone (history compacted) lists again instead
    of failing."""
    import threading
    import time

    from kubeapi import KubeAPI

    with KubeAPI() as api:
        (tmp_path / "kubeconfig").write_text(api.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        jobs = kubejobs.KubeJobs("hala", selector="app.kubernetes.io/part-of=x,hala.dev/run=r")
        t0 = time.monotonic()
        jobs.wait(1)  # no change: the watch ends at its timeout
        assert time.monotonic() - t0 >= 0.9 and jobs.version == "5"
        threading.Timer(0.5, api.change, args=("echo-a",)).start()
        t0 = time.monotonic()
        jobs.wait(60)
        assert time.monotonic() - t0 < 20 and jobs.version == "6"  # returned on the change, not after 60 s
        api.change("echo-b")  # between two waits: not missed, the next watch starts after version 6
        jobs.wait(60)
        assert jobs.version == "7"
        api.forget()
        jobs.wait(60)  # 410 Gone: no error, the version is dropped
        assert jobs.version is None
        jobs.wait(1)  # lists again, then watches from the fresh version
        assert jobs.version == str(api.version)
        watches = [p for p in api.requests if "watch=" in p.lower()]
        assert watches and all(
            "labelSelector=app.kubernetes.io%2Fpart-of%3Dx%2Chala.dev%2Frun%3Dr" in p for p in api.requests
        )
        assert (
            "resourceVersion=6" in watches[2]
            and len([p for p in api.requests if "watch=" not in p.lower()]) == 2
        )


# ------------------------------------------------------------------ the conductor through the official client


def _cluster_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: Any, recipe: recipe_mod.Recipe, **kw: Any
) -> int:
    """One conductor of `recipe` against the API stand-in, through KubeJobs (kubernetes' own client)."""
    (tmp_path / "kubeconfig").write_text(api.kubeconfig())
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    jobs = kubejobs.KubeJobs("hala", selector=conductor.run_selector(recipe))
    return conductor.conduct(
        recipe,
        jobs,
        variant="cpu",
        resync_seconds=1,
        recipe_arg=str(recipe.path),
        store_arg=recipe.store,
        **kw,
    )


def _kube_dag(
    tmp_path: Path, run: str = "r", overrides: list[str] | None = None, **kubernetes: Any
) -> recipe_mod.Recipe:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(12)))
    path = write_recipe(
        tmp_path,
        {
            "echo-a": {"stage": "echo", "shards": 2, "inputs": {"data": str(data)}},
            "echo-b": {"stage": "echo", "inputs": {"data": str(data), "after": "echo-a"}},
            "echo-c": {"stage": "echo", "inputs": {"data": str(data)}},
        },
    )
    if kubernetes:
        raw = yaml.safe_load(path.read_text())
        raw["kubernetes"] = kubernetes
        path.write_text(yaml.safe_dump(raw))
    return recipe_mod.load(path, overrides=overrides, run=run)


def test_two_runs_of_one_recipe_in_one_namespace_complete_side_by_side(tmp_path, echo, monkeypatch):
    """Run `a` is left running (its conductor replaced), run `b` of the same recipe with another --set runs to
    the end in the same namespace, then `a` finishes: each with its own Jobs and rows; no Job of one touched
    by the other (it used to adopt `a`'s Jobs, or delete them for the other fingerprint)."""
    from kubeapi import KubeAPI

    a = _kube_dag(tmp_path, run="a")
    b = _kube_dag(tmp_path, run="b", overrides=["echo-c.stamp=true"])
    with KubeAPI(max_requests=5000, seconds=600, controller=True) as api:
        assert _cluster_run(tmp_path, monkeypatch, api, a, max_polls=1) == 75  # a's conductor pod went away
        assert _cluster_run(tmp_path, monkeypatch, api, b) == 0
        assert _cluster_run(tmp_path, monkeypatch, api, a) == 0
        api.settle()
        assert not [r for r in api.requests if r.startswith("DELETE")], (
            "a Job of one run was deleted by the other"
        )
        assert sorted(api.jobs) == ["a-echo-a", "a-echo-b", "a-echo-c", "b-echo-a", "b-echo-b", "b-echo-c"]
        assert all(
            j["metadata"]["labels"]["hala.dev/run"] == j["metadata"]["name"][0] for j in api.jobs.values()
        )
    store = Path(a.store)
    for run in ("a", "b"):
        for step in ("echo-a", "echo-b", "echo-c"):
            m = json.loads((store / run / step / "_MANIFEST.json").read_text())
            assert m["outputs"]["data"]["rows"] == 12, (run, step)
    fa = json.loads((store / "a" / "echo-c" / "_MANIFEST.json").read_text())["fingerprint"]
    fb = json.loads((store / "b" / "echo-c" / "_MANIFEST.json").read_text())["fingerprint"]
    assert fa != fb  # the --set of run b reached its own Job only


def test_a_job_that_fails_past_its_pod_retries_is_recreated_and_completes(tmp_path, echo, monkeypatch):
    """echo-c's pods exit 75 (a node whose disk is full) until its Job fails (pod_retries 1: two pods); the
    conductor creates a second Job of the step, whose pod runs and commits. The attempt is on the Job and in
    `hala status`."""
    from kubeapi import KubeAPI

    recipe = _kube_dag(tmp_path, retries=2, pod_retries=1, retry_backoff_seconds=0)
    with KubeAPI(max_requests=5000, seconds=600, controller=True) as api:
        api.exits["r-echo-c"] = [75, 75]
        assert _cluster_run(tmp_path, monkeypatch, api, recipe) == 0
        api.settle()
        pods = [code for name, _, code in api.pods if name == "r-echo-c"]
        assert pods == [75, 75, 0]  # the first Job's two pods, then the second Job's one
        deleted = [r.split("?")[0] for r in api.requests if r.startswith("DELETE")]
        # the failed Job, then a new one
        assert deleted == ["DELETE /apis/batch/v1/namespaces/hala/jobs/r-echo-c"]
        assert api.jobs["r-echo-c"]["metadata"]["annotations"][conductor.ATTEMPT] == "2"
    run = json.loads((Path(recipe.store) / "r" / "_RUN.json").read_text())
    assert run["attempts"] == {"echo-a": 1, "echo-b": 1, "echo-c": 2} and run["conductor"]["ended"] == "done"
    status = hala("status", "r", "--store", recipe.store, "--json")
    assert {r["step"]: r["attempts"] for r in json.loads(status.stdout)}["echo-c"] == 2
    assert (Path(recipe.store) / "r" / "echo-c" / "_MANIFEST.json").exists()


def test_a_step_that_keeps_failing_stops_after_its_retries(tmp_path, echo, monkeypatch, capsys):
    """Every pod of echo-c exits 75: retries 1 means two Jobs, then the run ends with the step's failure (not
    75 forever): exit 1 (no status of the step says otherwise) and the reason of the last Job."""
    from kubeapi import KubeAPI

    recipe = _kube_dag(tmp_path, retries=1, pod_retries=0, retry_backoff_seconds=0)
    with KubeAPI(max_requests=5000, seconds=600, controller=True) as api:
        api.exits["r-echo-c"] = [75] * 10
        assert _cluster_run(tmp_path, monkeypatch, api, recipe) == 1
        api.settle()
        assert [code for name, _, code in api.pods if name == "r-echo-c"] == [75, 75]
    assert "step echo-c failed (exit 1): BackoffLimitExceeded" in "".join(capsys.readouterr())


def test_exit_3_stops_the_run_at_once(tmp_path, echo, monkeypatch, capsys):
    """Bad data does not get better by retrying: echo-a's shards exit 3; one Job, no retry, echo-b never
    created."""
    from kubeapi import KubeAPI

    data = tmp_path / "rows.jsonl"
    recipe = _kube_dag(tmp_path, retries=3, retry_backoff_seconds=0, overrides=["echo-a.misreport=true"])
    assert data.exists()
    with KubeAPI(max_requests=5000, seconds=600, controller=True) as api:
        assert _cluster_run(tmp_path, monkeypatch, api, recipe) == 3
        api.settle()
        assert "r-echo-a" in api.jobs and "r-echo-b" not in api.jobs
        assert not [r for r in api.requests if r.startswith("DELETE")]  # no second Job
    out = "".join(capsys.readouterr())
    assert "step echo-a failed (exit 3)" in out and "PodFailurePolicy" in out


def test_a_reapplied_conductor_retries_the_failed_step(tmp_path, echo, monkeypatch):
    """retries 0: echo-c's Job fails (a crash) and the conductor ends the run with it. The cause fixed, the
    conductor applied again: it gives the failed step a new Job (it used to adopt the failed one and report it
    again)."""
    from kubeapi import KubeAPI

    recipe = _kube_dag(tmp_path, retries=0, pod_retries=0, retry_backoff_seconds=0)
    with KubeAPI(max_requests=5000, seconds=600, controller=True) as api:
        api.exits["r-echo-c"] = [1]
        assert _cluster_run(tmp_path, monkeypatch, api, recipe) == 1
        api.settle()
        assert (
            json.loads((Path(recipe.store) / "r" / "_RUN.json").read_text())["conductor"]["ended"] == "failed"
        )
        assert _cluster_run(tmp_path, monkeypatch, api, recipe) == 0  # reapplied
        api.settle()
        assert api.jobs["r-echo-c"]["metadata"]["annotations"][conductor.ATTEMPT] == "2"
        assert [code for name, _, code in api.pods if name == "r-echo-c"] == [1, 0]
    assert (Path(recipe.store) / "r" / "echo-c" / "_MANIFEST.json").exists()


def test_hala_cancel_deletes_that_runs_jobs_only(tmp_path, echo, monkeypatch):
    """Two runs' Jobs and their conductors in one namespace; `hala cancel a` deletes run a's (its conductor
    first, which would create them again) and leaves run b's."""
    from kubeapi import KubeAPI

    a = _kube_dag(tmp_path, run="a")
    b = _kube_dag(tmp_path, run="b")
    with KubeAPI(max_requests=5000, seconds=600, controller=True) as api:
        for recipe in (a, b):
            assert _cluster_run(tmp_path, monkeypatch, api, recipe, max_polls=1) == 75
            # the conductor's own Job, as rendered (here from a step Job: conductor_job wants a recipe of
            # recipes/)
            job = k8s.step_job(recipe, recipe.steps["echo-c"], "cpu", recipe_arg=str(recipe.path))
            job["metadata"].update(
                name=k8s.conductor_name(recipe), labels=k8s.labels(recipe, "conductor", "cli", queued=False)
            )
            job["spec"]["template"]["spec"]["containers"][0]["name"] = "conductor"
            kubejobs.KubeJobs("hala").create(job)
        api.settle()
        out = subprocess.run(
            [sys.executable, "-m", "hala.ops.cli", "cancel", "a", "-n", "hala"],
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")},
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        deleted = [r.split("?")[0].rsplit("/", 1)[1] for r in api.requests if r.startswith("DELETE")]
        assert deleted[0] == "hala-conductor-a" and sorted(deleted) == [
            "a-echo-a",
            "a-echo-c",
            "hala-conductor-a",
        ]
        assert sorted(api.jobs) == ["b-echo-a", "b-echo-c", "hala-conductor-b"]
        again = subprocess.run(
            [sys.executable, "-m", "hala.ops.cli", "cancel", "a", "-n", "hala"],
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")},
            timeout=120,
        )
        assert again.returncode == 1 and "no Job of run 'a'" in again.stderr


def test_a_second_run_renders_beside_the_first(tmp_path):
    """`hala render k8s R --run b`: the conductor and every Job carry run b, the shared objects (namespace,
    recipe, volume, RBAC) are the same as run a's, so `kubectl apply -k` of both leaves two runs side by
    side."""
    for run in ("a", "b"):
        out = hala(
            "render", "k8s", "recipes/tiny.yaml", "--variant", "cpu", "--run", run, "-o", str(tmp_path / run)
        )
        assert out.returncode == 0, out.stderr
    docs = {
        run: {
            p.relative_to(tmp_path / run).as_posix(): list(yaml.safe_load_all(p.read_text()))
            for p in (tmp_path / run).rglob("*.yaml")
        }
        for run in ("a", "b")
    }
    for name in ("namespace.yaml", "recipe.yaml", "rbac.yaml", "storage.yaml", "kustomization.yaml"):
        assert docs["a"][name] == docs["b"][name], name
    conductor_b = docs["b"]["conductor.yaml"][0]
    assert conductor_b["metadata"]["name"] == "hala-conductor-b"
    args = conductor_b["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--run") + 1] == "b"
    names = {
        run: {d["metadata"]["name"] for f, objs in docs[run].items() if f.startswith("jobs/") for d in objs}
        for run in ("a", "b")
    }
    assert names["a"] and not names["a"] & names["b"] and all(n.startswith("b-") for n in names["b"])


def test_a_retried_pod_of_the_same_conductor_does_not_retry_the_failed_step_again(
    tmp_path, echo, monkeypatch
):
    """The conductor Job retries its own pod when the conductor exits non-zero; that pod (same Job uid, the
    downward API's HALA_CONDUCTOR_ID) reports the failure again instead of spending a new budget of step
    Jobs."""
    from kubeapi import KubeAPI

    recipe = _kube_dag(tmp_path, retries=0, pod_retries=0, retry_backoff_seconds=0)
    monkeypatch.setenv("HALA_CONDUCTOR_ID", "uid-of-the-conductor-job")
    with KubeAPI(max_requests=5000, seconds=600, controller=True) as api:
        api.exits["r-echo-c"] = [1]
        assert _cluster_run(tmp_path, monkeypatch, api, recipe) == 1
        api.settle()
        assert _cluster_run(tmp_path, monkeypatch, api, recipe) == 1  # the conductor Job's next pod
        api.settle()
        assert [code for name, _, code in api.pods if name == "r-echo-c"] == [1]
        assert not [r for r in api.requests if r.startswith("DELETE")]
    job = manifests.conductor_job(_load(TINY), "cpu", None, None)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (
        env["HALA_CONDUCTOR_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
