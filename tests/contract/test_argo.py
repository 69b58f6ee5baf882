"""The cluster's own engines: the DAG as an Argo Workflow, the queues of Kueue (issue 28).

No Argo controller and no Kueue run here. The renderings are checked against the projects' own CRD schemas
(tests/_lib/crdschema.py, strict), the Jobs inside them with kubernetes-validate, their rules by reading them
(edges, retries, placement, rights), and the Workflow by running its tasks on this machine in the order of its
DAG (tests/_lib/argorun.py) against the Jobs API stand-in, whose commits must equal a local run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hala.contract import recipe as recipe_mod
from hala.ops import argo, k8s, kueue, manifests
from helpers import REPO, hala, write_recipe

FIXTURES = Path(__file__).resolve().parent / "fixture_stages"
TINY = REPO / "recipes" / "tiny.yaml"
PAPER = REPO / "recipes" / "hala-paper.yaml"
TRANSLATE = REPO / "recipes" / "translate-hala.yaml"
K8S_VERSION = "1.37.0"
RENDERINGS = [  # (what, recipe, flags, folder under manifests/)
    ("argo", TINY, ["--variant", "cpu"], "tiny/argo"),
    ("argo", PAPER, [], "hala-paper/argo"),
    ("kueue", PAPER, [], "hala-paper/kueue"),
    ("argo", TRANSLATE, [], "translate-hala/argo"),
]


def _load(path: Path, queue: str | None = None) -> recipe_mod.Recipe:
    recipe = recipe_mod.load(path, check_paths=False)
    if queue:
        recipe.kubernetes["queue"] = queue
    return recipe


def _templates(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in workflow["spec"]["templates"]}


def _tasks(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dag = _templates(workflow)[workflow["spec"]["entrypoint"]]["dag"]["tasks"]
    return {t["name"]: t for t in dag}


@pytest.fixture(scope="module")
def crds():
    import crdschema

    if not crdschema.SCHEMAS.exists():
        pytest.fail(f"the CRD schemas are missing: {crdschema.SCHEMAS} (set HALA_SHARED_SCHEMAS)")
    return crdschema


@pytest.mark.parametrize("what,recipe,flags,folder", RENDERINGS)
def test_checked_in_argo_and_kueue_manifests_equal_the_rendering(tmp_path, what, recipe, flags, folder):
    out = tmp_path / folder
    done = hala("render", what, str(recipe.relative_to(REPO)), *flags, "-o", str(out))
    assert done.returncode == 0, done.stderr
    rendered = {p.relative_to(out): p.read_text() for p in out.rglob("*.yaml")}
    checked_in = {
        p.relative_to(REPO / "manifests" / folder): p.read_text()
        for p in (REPO / "manifests" / folder).rglob("*.yaml")
    }
    fix = f"run `hala render {what} {recipe.relative_to(REPO)} {' '.join(flags)} -o manifests/{folder}`"
    assert set(rendered) == set(checked_in), fix
    for name, text in rendered.items():
        assert checked_in[name] == text.replace(str(out), f"manifests/{folder}"), f"{name}: {fix}"


@pytest.mark.parametrize("recipe,variant", [(TINY, "cpu"), (PAPER, "cuda"), (TRANSLATE, "cuda")])
@pytest.mark.parametrize("queue", [None, "hala"])
def test_workflows_validate_against_argo_crds_and_their_jobs_against_kubernetes(crds, recipe, variant, queue):
    files = argo.render(_load(recipe, queue), variant)
    custom = [
        o for name, objs in files.items() if name != "kustomization.yaml" for o in objs if crds.known(o)
    ]
    assert {o["kind"] for o in custom} == {"Workflow", "WorkflowTemplate"}
    if recipe == TRANSLATE:  # a served model: scaled up before its user, down after it and on exit
        workflow = files["workflow.yaml"][0]
        tasks, templates = _tasks(workflow), _templates(workflow)
        assert "served-translator-up" in tasks["translate-data"]["dependencies"]
        assert tasks["served-translator-down"]["dependencies"] == ["translate-data-gather"]
        assert workflow["spec"]["onExit"] == "served-down-all"
        patch = yaml.safe_load(templates["served-translator-up"]["resource"]["manifest"])
        assert patch["spec"] == {"replicas": 2} and patch["kind"] == "Deployment"
    for obj in custom:
        assert crds.errors(obj) == [], obj["kind"]
        for job in crds.embedded_jobs(obj):
            job = {**job, "metadata": {**job["metadata"], "name": job["metadata"]["generateName"] + "x1234"}}
            kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    for obj in [o for name, objs in files.items() if name != "kustomization.yaml" for o in objs]:
        if not crds.known(obj):  # namespace, recipe, volume, RBAC
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_crd_check_is_strict(crds):
    workflow = argo.workflow(_load(PAPER))
    workflow["spec"]["templates"][1]["retryStrategy"]["limt"] = 3
    workflow["spec"]["podGC"]["strategy"] = "Sometimes"
    found = crds.errors(workflow)
    assert any("'limt' was unexpected" in e for e in found) and any("Sometimes" in e for e in found)


def test_kueue_objects_validate_against_kueue_crds(crds):
    files = kueue.render(_load(PAPER, "gpu"))
    objects = [o for name, objs in files.items() if name != "kustomization.yaml" for o in objs]
    kinds = sorted(o["kind"] for o in objects if crds.known(o))
    assert kinds == ["ClusterQueue", "LocalQueue", *["ResourceFlavor"] * 4, "WorkloadPriorityClass"]
    for obj in objects:
        if crds.known(obj):
            assert crds.errors(obj) == [], obj["kind"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    local = next(o for o in objects if o["kind"] == "LocalQueue")
    assert local["metadata"] == {**local["metadata"], "name": "gpu", "namespace": "hala-paper"}
    # the FP8 teacher's affinity (compute capability >= 8.9) is satisfied by exactly the Hopper and Ada
    # flavors
    flavors = {
        o["metadata"]["name"]: o["spec"].get("nodeLabels", {})
        for o in objects
        if o["kind"] == "ResourceFlavor"
    }
    terms = k8s.fp8_affinity()["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]

    def satisfies(labels: dict[str, str]) -> bool:
        def holds(e: dict[str, Any]) -> bool:
            if e["key"] not in labels:
                return False
            return (
                labels[e["key"]] in e["values"]
                if e["operator"] == "In"
                else int(labels[e["key"]]) > int(e["values"][0])
            )

        return any(all(holds(e) for e in term["matchExpressions"]) for term in terms)

    assert sorted(n for n, labels in flavors.items() if satisfies(labels)) == ["gpu-ada", "gpu-hopper"]


def test_the_dag_is_the_recipes_with_sharded_steps_as_indexed_jobs_and_their_gathers():
    recipe = _load(PAPER)
    workflow = argo.workflow(recipe)
    tasks, templates = _tasks(workflow), _templates(workflow)
    enabled = {s.name: s for s in recipe.steps.values() if s.enabled}

    def committed_by(step: str) -> str:
        return argo.task_name(enabled[step]) + ("-gather" if enabled[step].shards > 1 else "")

    # every step, a gather after each sharded one, the run's record first and its report last
    assert len(tasks) == len(enabled) + sum(s.shards > 1 for s in enabled.values()) + 2
    assert "dependencies" not in tasks["run-record"]
    assert sorted(tasks["run-report"]["dependencies"]) == sorted(committed_by(n) for n in enabled)
    assert templates["run-record"]["container"]["args"][:2] == ["record", "/opt/hala/recipes/hala-paper.yaml"]
    for step in enabled.values():
        task = tasks[argo.task_name(step)]
        wanted = sorted(committed_by(u) for u in step.upstream if u in enabled) or ["run-record"]
        assert sorted(task.get("dependencies", [])) == wanted, step.name
        template = templates[task["template"]]
        if step.shards > 1:
            job = yaml.safe_load(template["resource"]["manifest"])
            assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == step.shards
            assert job["spec"]["maxFailedIndexes"] == 0 and "backoffLimitPerIndex" in job["spec"]
            # the conductor's Job for the step, but named afresh on every submission
            conductor_job = k8s.step_job(recipe, step, "cuda")
            assert job["spec"] == conductor_job["spec"]
            assert job["metadata"]["generateName"].startswith(conductor_job["metadata"]["name"][:40])
            assert template["resource"]["successCondition"] == f"status.succeeded > {step.shards - 1}"
            gather = tasks[f"{argo.task_name(step)}-gather"]
            assert gather["dependencies"] == [argo.task_name(step)]
            assert templates[gather["template"]]["container"]["args"][:3] == [
                "gather",
                "/opt/hala/recipes/hala-paper.yaml",
                step.name,
            ]
        else:
            container = template["container"]
            assert (
                container["args"]
                == k8s.step_job(recipe, step, "cuda")["spec"]["template"]["spec"]["containers"][0]["args"]
            )
            assert container["image"] == f"local/hala-{step.spec.env}:dev-cuda"


def test_retries_by_exit_code_and_the_cluster_settings_reach_the_workflow():
    from argorun import _expr

    recipe = _load(PAPER)
    recipe.kubernetes.update(
        parallelism=3,
        active_deadline_seconds=86400,
        pod_gc="OnWorkflowSuccess",
        ttl_seconds=3600,
        retries=1,
        pod_retries=1,
        retry_backoff_seconds=60,
    )
    workflow = argo.workflow(recipe)
    spec = workflow["spec"]
    assert spec["parallelism"] == 3 and spec["activeDeadlineSeconds"] == 86400
    assert spec["podGC"] == {"strategy": "OnWorkflowSuccess"} and spec["ttlStrategy"] == {
        "secondsAfterCompletion": 3600
    }
    templates = _templates(workflow)
    step = templates[argo.task_name(recipe.steps["train-translator"])]["retryStrategy"]
    assert step["limit"] == 2 and step["backoff"]["duration"] == "60s"
    retried = {
        code: _expr(step["expression"], {"status": "Failed", "exitCode": str(code)})
        for code in (1, 2, 3, 75, 137)
    }
    assert retried == {1: True, 2: False, 3: False, 75: True, 137: True}
    assert _expr(step["expression"], {"status": "Error", "exitCode": ""})  # a lost pod: no exit code, retried
    sharded = templates[argo.task_name(recipe.steps["translate-openorca"])]["retryStrategy"]
    assert sharded["limit"] == 1 and "expression" not in sharded  # new Jobs, as the conductor's retries


def test_fp8_placement_gpus_and_service_account_tokens():
    recipe = _load(PAPER)
    workflow = argo.workflow(recipe)
    templates = _templates(workflow)
    assert workflow["spec"]["automountServiceAccountToken"] is False
    assert workflow["spec"]["executor"] == {"serviceAccountName": argo.EXECUTOR}
    for step in (s for s in recipe.steps.values() if s.enabled):
        job = k8s.step_job(recipe, step, "cuda")
        pod = job["spec"]["template"]["spec"]
        template = templates[argo.task_name(step)]
        if step.shards > 1:
            assert (
                template["serviceAccountName"] == argo.JOBS
                and template["executor"]["serviceAccountName"] == argo.JOBS
            )
            continue
        assert template["automountServiceAccountToken"] is False and "serviceAccountName" not in template
        assert template.get("affinity") == pod.get("affinity") and template.get("tolerations") == pod.get(
            "tolerations"
        )
        assert template["container"]["resources"] == pod["containers"][0]["resources"]
        assert template["container"]["securityContext"]["readOnlyRootFilesystem"] is True
    teacher = templates[argo.task_name(recipe.steps["evaluate-fp8-teacher"])]
    assert teacher["affinity"] == k8s.fp8_affinity()
    roles = {o["metadata"]["name"]: o["rules"] for o in argo.rbac(recipe) if o["kind"] == "Role"}
    assert roles[argo.EXECUTOR] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}
    ]
    assert {r["apiGroups"][0]: r["resources"] for r in roles[argo.JOBS]} == {
        "argoproj.io": ["workflowtaskresults"],
        "batch": ["jobs"],
    }


def test_with_a_kueue_queue_every_job_is_labelled_and_created_suspended():
    recipe = _load(PAPER, "gpu")
    recipe.kubernetes["priority_class"] = "hala-batch"
    jobs = [
        o
        for name, objs in manifests.render(recipe, "cuda").items()
        if name != "kustomization.yaml"
        for o in objs
        if o["kind"] == "Job"
    ]
    workflow = argo.workflow(recipe)
    jobs += [
        yaml.safe_load(t["resource"]["manifest"]) for t in workflow["spec"]["templates"] if "resource" in t
    ]
    conductor = [j for j in jobs if j["metadata"]["labels"]["hala.dev/step"] == "conductor"]
    steps = [j for j in jobs if j not in conductor]
    assert len(conductor) == 1 and "kueue.x-k8s.io/queue-name" not in conductor[0]["metadata"]["labels"]
    assert len(steps) > 40
    for job in steps:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu", job["metadata"]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "hala-batch"
        assert job["spec"]["suspend"] is True
    pods = [t for t in workflow["spec"]["templates"] if "container" in t]
    assert pods and all(t["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu" for t in pods)


# ------------------------------------------------------------------ the Workflow, run


@pytest.fixture()
def echo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALA_STAGES_PATH", str(FIXTURES))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    )


def _echo_dag(tmp_path: Path, run: str, **kubernetes: Any) -> recipe_mod.Recipe:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(12)))
    path = write_recipe(
        tmp_path,
        {
            "echo-a": {"stage": "echo", "shards": 2, "inputs": {"data": str(data)}},
            "echo-b": {"stage": "echo", "inputs": {"data": str(data), "after": "echo-a"}},
            "echo-c": {"stage": "echo", "inputs": {"data": str(data)}, "config": {"quarantine_every": 4}},
        },
        kubernetes={"namespace": "hala", "retry_backoff_seconds": 0, **kubernetes},
    )
    return recipe_mod.load(path, run=run)


def _rows(store: Path, run: str) -> dict[str, Any]:
    out = {}
    for step in ("echo-a", "echo-b", "echo-c"):
        manifest = json.loads((store / run / step / "_MANIFEST.json").read_text())
        files = sorted(
            (f["path"].split("/", 1)[1], f["sha256"])
            for o in manifest["outputs"].values()
            for f in o["files"]
        )
        out[step] = (manifest["counts"], files)
    return out


def test_the_rendered_workflow_run_in_dag_order_commits_what_a_local_run_commits(tmp_path, echo):
    """Every task of the rendered Workflow, in the order of its DAG: echo-a's Indexed Job through the Jobs API
    (2 pods), its gather, echo-b after it, echo-c beside; then the same recipe by `hala run` into another run:
    the same counts and the same files. A second submission finds every step committed (exit 0 at once)."""
    import argorun
    from kubeapi import KubeAPI

    recipe = _echo_dag(tmp_path, "argo")
    workflow = argo.workflow(recipe, "cpu", recipe_arg=str(recipe.path), store_arg=recipe.store)
    logs: dict[str, str] = {}
    with KubeAPI(max_requests=2000, seconds=600, controller=True) as api:
        result = argorun.run(workflow, api, dict(os.environ), logs=logs)
        api.settle()
        assert sorted(i for name, i, _ in api.pods) == [0, 1]
    tasks = ("run-record", "echo-a", "echo-a-gather", "echo-b", "echo-c", "run-report")
    assert result == {t: ("Succeeded", 1) for t in tasks}, logs
    local = hala("run", str(recipe.path), "--run", "local")
    assert local.returncode == 0, local.stderr
    store = Path(recipe.store)
    assert _rows(store, "argo") == _rows(store, "local")
    # the run's record and report, as every runner leaves them: `hala status` reads the Workflow's run
    status = json.loads(hala("status", "argo", "--store", str(store), "--json").stdout)
    assert {r["step"]: r["state"] for r in status} == dict.fromkeys(
        ("echo-a", "echo-b", "echo-c"), "committed"
    )
    assert json.loads((store / "argo" / "_RUN.json").read_text())["runner"] == "argo"
    assert (store / "argo" / "_report" / "report.html").exists()
    assert _rows(store, "argo")["echo-c"][0]["rows_quarantined"] == 3
    before = {p: p.stat().st_mtime_ns for p in (store / "argo").rglob("_MANIFEST.json")}
    with KubeAPI(max_requests=2000, seconds=600, controller=True) as api:
        again = argorun.run(workflow, api, dict(os.environ))
        api.settle()
    assert again == result  # resubmitted: every step found its manifest and exited 0
    assert {p: p.stat().st_mtime_ns for p in (store / "argo").rglob("_MANIFEST.json")} == before


def test_a_failing_step_is_retried_on_75_and_not_on_3_and_its_dependents_never_start(tmp_path, echo):
    import argorun
    from kubeapi import KubeAPI

    recipe = _echo_dag(tmp_path, "argo", retries=1, pod_retries=1)
    workflow = argo.workflow(recipe, "cpu", recipe_arg=str(recipe.path), store_arg=recipe.store)
    with KubeAPI(max_requests=2000, seconds=600, controller=True) as api:
        result = argorun.run(workflow, api, dict(os.environ), exits={"echo-c": [75]})
        api.settle()
    assert result["echo-c"] == ("Succeeded", 2)  # a 75, then the step itself

    bad = recipe_mod.load(recipe.path, run="bad", overrides=["echo-a.misreport=true"])
    workflow = argo.workflow(bad, "cpu", recipe_arg=str(bad.path), store_arg=bad.store)
    with KubeAPI(max_requests=2000, seconds=600, controller=True) as api:
        result = argorun.run(workflow, api, dict(os.environ))
        api.settle()
        # each shard exits 3 once (FailIndex, no pod retry); the task's one retry is a new Job, failing alike
        assert [code for _, _, code in api.pods] == [3, 3]
        assert len(api.jobs) == 2
    assert result["echo-a"] == ("Failed", 2)
    assert result["echo-a-gather"] == result["echo-b"] == result["run-report"] == ("Omitted", 0)


def test_a_served_model_is_started_by_its_scale_task_reached_through_its_service_and_stopped(tmp_path, echo):
    """A served model in the Workflow: its scale-up task (after its model's step, before its first user)
    starts the rendered Deployment's pod and waits for its startup probe; the user's pod reaches it through
    the Service's cluster name (HALA_SERVED_URL_STANDIN as rendered); the scale-down task after the last user
    stops it, and the exit handler scales it down again whatever happened. The server is the OpenAI stand-in
    through the served model's `command`, as SGLang or TGI would be."""
    import socket

    import argorun
    import podrun
    from kubeapi import KubeAPI

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(6)))
    path = write_recipe(
        tmp_path,
        {
            "echo-a": {"stage": "echo", "shards": 2, "inputs": {"data": str(data)}},
            "echo-b": {
                "stage": "echo",
                "inputs": {"data": str(data)},
                "config": {"endpoint": {"served": "standin"}},
            },
        },
        kubernetes={"namespace": "hala", "retry_backoff_seconds": 0},
        served={
            "standin": {
                "model": "echo-a",  # a step's output: the scale-up waits for it
                "port": 8471,
                "ready_seconds": 120,
                "command": [
                    "{python}",
                    str(REPO / "tests/_lib/openaiserver.py"),
                    "--port",
                    "{port}",
                    "--model",
                    "{name}",
                ],
            }
        },
    )
    recipe = recipe_mod.load(path, run="argo")
    workflow = argo.workflow(recipe, "cpu", recipe_arg=str(recipe.path), store_arg=recipe.store)
    objects = k8s.served_objects(
        recipe, "standin", "cpu", recipe_arg=str(recipe.path), store_arg=recipe.store
    )
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    tasks = {t["name"]: t for t in workflow["spec"]["templates"][0]["dag"]["tasks"]}
    assert tasks["served-standin-up"]["dependencies"] == ["echo-a-gather"]
    assert "served-standin-up" in tasks["echo-b"]["dependencies"]
    env_b = {
        e["name"]: e.get("value")
        for e in next(t for t in workflow["spec"]["templates"] if t["name"] == "echo-b")["container"]["env"]
    }
    assert env_b["HALA_SERVED_URL_STANDIN"] == "http://served-argo-standin.hala.svc:8471/v1"

    pods = podrun.Venvs(dict(os.environ), services=podrun.service_ports(objects))
    served = argorun.Served(pods, {deployment["metadata"]["name"]: deployment}, timeout=120)
    logs: dict[str, str] = {}
    with KubeAPI(max_requests=2000, seconds=600, controller=True, pods=pods) as api:
        result = argorun.run(workflow, api, dict(os.environ), logs=logs, pods=pods, served=served, parallel=2)
        api.settle()
    assert all(phase == "Succeeded" for phase, _ in result.values()), (result, logs)
    name = deployment["metadata"]["name"]
    assert served.history == [(name, 1), (name, 0), (name, 0)]  # up, down after echo-b, the exit handler
    manifest = json.loads((Path(recipe.store) / "argo" / "echo-b" / "_MANIFEST.json").read_text())
    rows_file = Path(recipe.store) / "argo" / "echo-b" / manifest["outputs"]["data"]["files"][0]["path"]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(rows) == 6 and {r["served"] for r in rows} == {"standin"}  # its answers, through the Service
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    with socket.socket() as s:  # stopped: nothing listens on the pod's port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
