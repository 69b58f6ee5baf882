"""Kubernetes: the manifests of a recipe (`hala render k8s`) and the conductor (`hala run --runner k8s`).

    hala render k8s recipes/hala-paper.yaml -o manifests/hala-paper     # cuda images, GPUs, FP8 placement
    hala render k8s recipes/tiny.yaml --variant cpu -o manifests/tiny   # cpu images, no GPU
    kubectl apply -k manifests/hala-paper/

What `kubectl apply -k` creates: the namespace, the store's volume claim (ReadWriteMany; an fsspec URL
store such as s3://... needs none), the recipe as a ConfigMap, RBAC for the conductor and the conductor
Job. The conductor (hala-cli image) creates one Job per step in dependency order, only once the step's
inputs are committed (no pod holds a GPU while it waits), skips cached steps, follows Job conditions,
gathers sharded steps after their Indexed Job, stops on a failed Job with its reason, and adopts the
Jobs it finds after its own restart. `jobs/` holds every step's Job on its own, for per-stage reuse
(`kubectl apply -f manifests/hala-paper/jobs/26-merge-hala-350m.yaml`, and `NN-<step>-gather.yaml` after a
sharded one); they are not in the kustomization.

No cluster ran these manifests here: they are validated offline (kubernetes-validate --strict), policy-
tested, and the conductor's decisions are tested against an in-memory stand-in of the Jobs API.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from hala.contract import logs
from hala.contract.errors import EXIT_CONFIG, EXIT_DATA, EXIT_TEMPORARY, ConfigError, HalaError
from hala.contract.recipe import Recipe, Step
from hala.contract.store import Store
from hala.ops import compose as compose_mod, images as images_mod, runner, schedule
from hala.ops.gather import gather_step
from hala.ops.resources import FP8_MIN_CAPABILITY, Needs, needs

STORE_MOUNT = compose_mod.STORE_IN_IMAGE
UID = 1000
CONDUCTOR = "hala-conductor"
HF_SECRET = "hala-hf-token"          # optional: `kubectl create secret generic hala-hf-token --from-literal=token=hf_...`
STORE_SECRET = "hala-store-credentials"  # optional: env for an object store (AWS_ACCESS_KEY_ID, ...)
FINGERPRINT = "hala.dev/fingerprint"
TTL_SECONDS = 7 * 24 * 3600
# requests = limits per stage and GPU (a GPU step gets them times its GPUs); resources in the recipe win
DEFAULTS = {
    "prepare": ("2", "8Gi"), "merge": ("4", "64Gi"), "publish": ("1", "4Gi"), "cli": ("1", "2Gi"),
    "gpu": ("8", "96Gi"),
}
TINY_DEFAULT = ("2", "8Gi")


def k8s_name(text: str) -> str:
    """A DNS label (Indexed Job pods take the Job's name as hostname): dots and capitals go, 63 characters at most."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if len(name) > 63:
        name = f"{name[:54].rstrip('-')}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


def namespace(recipe: Recipe) -> str:
    default = recipe.name if recipe.name.startswith("hala") else f"hala-{recipe.name}"
    return str(recipe.kubernetes.get("namespace") or k8s_name(default))


def job_name(recipe: Recipe, step: Step) -> str:
    return k8s_name(step.name)


def _labels(recipe: Recipe, step: str, stage: str) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "hala", "app.kubernetes.io/part-of": k8s_name(recipe.name),
              "hala.dev/run": k8s_name(recipe.run), "hala.dev/step": k8s_name(step), "hala.dev/stage": stage}
    if recipe.kubernetes.get("queue"):
        labels["kueue.x-k8s.io/queue-name"] = str(recipe.kubernetes["queue"])  # Kueue admits the Job into this queue
    return labels


_store_url = compose_mod.store_url  # an object store's URL as it is, else the volume at /store (one rule for both)


def _env(recipe: Recipe, variant: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HALA_LOG_FORMAT", "value": "json"},
        {"name": "HOME", "value": "/home/app"},
        {"name": "HF_HOME", "value": "/home/app/.cache/huggingface"},
        # the token of a gated model (the teacher) from a Secret, if there is one; never written here
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": "token", "optional": True}}},
    ]
    if variant == "cpu":
        env += [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "HF_DATASETS_OFFLINE", "value": "1"},
                {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}]
    return env


def _pod(recipe: Recipe, container: dict[str, Any], need: Needs | None, variant: str, service_account: str | None = None,
         recipe_arg: str | None = None) -> dict[str, Any]:
    """Pod spec shared by step Jobs and the conductor: non-root, nothing escalates, read-only root, writable
    paths as emptyDir, the store and the recipe mounted (over the baked copy, beside its samples)."""
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": "/home/app"},
              {"name": "recipe", "mountPath": recipe_arg or compose_mod.recipe_in_image(recipe), "subPath": recipe.path.name,
               "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}},
        {"name": "recipe", "configMap": {"name": "hala-recipe"}},
    ]
    if _store_url(recipe) == STORE_MOUNT:
        mounts.append({"name": "store", "mountPath": STORE_MOUNT})
        volumes.append({"name": "store", "persistentVolumeClaim": {"claimName": "hala-store"}})
    if need and need.shm:
        # vLLM and torch's data loaders share tensors through /dev/shm; the container default is 64 MiB
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": need.shm}})
    container.update(
        imagePullPolicy="IfNotPresent",
        env=_env(recipe, variant),
        envFrom=[{"secretRef": {"name": STORE_SECRET, "optional": True}}],
        volumeMounts=mounts,
        securityContext={"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                         "capabilities": {"drop": ["ALL"]}},
    )
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    else:
        spec["automountServiceAccountToken"] = False  # a step never talks to the API server
    if variant == "cuda" and need and need.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if need.fp8:
            spec["affinity"] = fp8_affinity()
    return spec


def fp8_affinity() -> dict[str, Any]:
    """Nodes whose GPUs have compute capability >= 8.9, from GPU Feature Discovery's labels. Not
    nvidia.com/gpu.family: some versions call Ada 'ampere'. Node selector terms are ORed:
    major > 8, or major == 8 and minor > 8."""
    major, minor = FP8_MIN_CAPABILITY
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": [str(major)]}]},
        {"matchExpressions": [{"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": [str(major)]},
                              {"key": "nvidia.com/gpu.compute.minor", "operator": "Gt", "values": [str(minor - 1)]}]},
    ]}}}


def _resources(step_stage: str, need: Needs | None, variant: str) -> dict[str, Any]:
    if variant == "cpu":
        cpu, mem = TINY_DEFAULT
    elif need and need.gpus:
        base_cpu, base_mem = DEFAULTS["gpu"]
        cpu, mem = str(int(base_cpu) * need.gpus), f"{int(base_mem[:-2]) * need.gpus}Gi"
    else:
        cpu, mem = DEFAULTS.get(step_stage, DEFAULTS["cli"])
    if need:
        cpu, mem = need.cpu or cpu, need.memory or mem
    req: dict[str, Any] = {"cpu": cpu, "memory": mem}
    lim: dict[str, Any] = {"cpu": cpu, "memory": mem}
    if variant == "cuda" and need and need.gpus:
        req["nvidia.com/gpu"] = lim["nvidia.com/gpu"] = need.gpus  # extended resources: request == limit
    return {"requests": req, "limits": lim}


def step_job(recipe: Recipe, step: Step, variant: str = "cuda", registry: str | None = None, tag: str | None = None,
             fingerprint: str | None = None, recipe_arg: str | None = None, store_arg: str | None = None) -> dict[str, Any]:
    """One step's Job. The conductor passes the fingerprint (adoption after a restart compares it) and, in the
    tests, the paths it runs with; rendered files carry the in-image paths."""
    if step.spec is None:
        raise ConfigError(f"step '{step.name}': stage '{step.stage}' is not built yet, so it has no image")
    need = needs(recipe, step)
    if variant == "cpu":
        need = Needs(gpus=0, fp8=False, cpu=need.cpu, memory=need.memory, shm=need.shm)
    args = compose_mod.step_args(recipe, step, None, store=store_arg or _store_url(recipe), recipe_arg=recipe_arg)
    container = {"name": "step", "image": images_mod.reference(step.spec.env, variant, registry, tag), "args": args,
                 "resources": _resources(step.stage, need, variant)}
    pod = _pod(recipe, container, need, variant, recipe_arg=recipe_arg)
    retries = int(recipe.kubernetes.get("retries", 2))
    spec: dict[str, Any] = {}
    if step.shards > 1:
        # an Indexed Job: hala.contract.step reads JOB_COMPLETION_INDEX as the shard; each index retries on its own, and
        # one index that fails for good fails the step (gather needs every part)
        spec.update(completionMode="Indexed", completions=step.shards,
                    parallelism=int(step.resources.get("parallelism", step.shards)),
                    backoffLimitPerIndex=retries, maxFailedIndexes=0)
    else:
        spec["backoffLimit"] = retries
    spec.update({
        "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", TTL_SECONDS)),
        "podFailurePolicy": {"rules": [
            # exit 2 (config) and 3 (bad input) will not get better by retrying; exit 75 and crashes retry
            {"action": "FailIndex" if step.shards > 1 else "FailJob",
             "onExitCodes": {"containerName": "step", "operator": "In", "values": [EXIT_CONFIG, EXIT_DATA]}},
            # preemption, eviction, node drain: not the step's failure, not counted against its retries
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]},
        "template": {"metadata": {"labels": _labels(recipe, step.name, step.stage)}, "spec": pod},
    })
    meta: dict[str, Any] = {"name": job_name(recipe, step), "namespace": namespace(recipe),
                            "labels": _labels(recipe, step.name, step.stage)}
    if fingerprint:
        meta["annotations"] = {FINGERPRINT: fingerprint}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def conductor_job(recipe: Recipe, variant: str, registry: str | None, tag: str | None) -> dict[str, Any]:
    args = ["run", compose_mod.recipe_in_image(recipe), "--runner", "k8s", "--store", _store_url(recipe), "--run", recipe.run,
            "--variant", variant, "--namespace", namespace(recipe), *compose_mod.set_args(recipe)]
    if registry:
        args += ["--registry", registry]
    if tag:
        args += ["--tag", tag]
    container = {"name": "conductor", "image": images_mod.reference("cli", variant, registry, tag), "args": args,
                 "resources": _resources("cli", None, "cuda")}
    pod = _pod(recipe, container, None, variant, service_account=CONDUCTOR)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": CONDUCTOR, "namespace": namespace(recipe), "labels": _labels(recipe, "conductor", "cli")},
            "spec": {
                # a restarted conductor adopts the Jobs it created instead of creating them again
                "backoffLimit": 3,
                "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", TTL_SECONDS)),
                "podFailurePolicy": {"rules": [
                    {"action": "FailJob", "onExitCodes": {"containerName": "conductor", "operator": "In", "values": [EXIT_CONFIG, EXIT_DATA]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]},
                "template": {"metadata": {"labels": _labels(recipe, "conductor", "cli")}, "spec": pod},
            }}


def base_objects(recipe: Recipe, variant: str, registry: str | None, tag: str | None) -> dict[str, list[dict[str, Any]]]:
    ns = namespace(recipe)
    meta = lambda name: {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": "hala"}}  # noqa: E731
    files: dict[str, list[dict[str, Any]]] = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"app.kubernetes.io/name": "hala"}}}],
        "recipe.yaml": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("hala-recipe"),
                         "data": {recipe.path.name: recipe.path.read_text(encoding="utf-8")}}],
        "rbac.yaml": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(CONDUCTOR)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(CONDUCTOR), "rules": [
                {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
            ]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(CONDUCTOR),
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONDUCTOR},
             "subjects": [{"kind": "ServiceAccount", "name": CONDUCTOR, "namespace": ns}]},
        ],
        "conductor.yaml": [conductor_job(recipe, variant, registry, tag)],
    }
    if _store_url(recipe) == STORE_MOUNT:
        pvc: dict[str, Any] = {"accessModes": ["ReadWriteMany"],  # every step's pod, on any node, reads and writes it
                               "resources": {"requests": {"storage": str(recipe.kubernetes.get("storage", "100Gi"))}}}
        if recipe.kubernetes.get("storage_class"):
            pvc["storageClassName"] = recipe.kubernetes["storage_class"]
        files["storage.yaml"] = [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta("hala-store"), "spec": pvc}]
    return files


def render(recipe: Recipe, variant: str = "cuda", registry: str | None = None, tag: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """File name -> objects: the base files, kustomization.yaml and jobs/NN-<step>.yaml."""
    files = base_objects(recipe, variant, registry, tag)
    order = ["namespace.yaml", "storage.yaml", "recipe.yaml", "rbac.yaml", "conductor.yaml"]
    files["kustomization.yaml"] = [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                    "resources": [f for f in order if f in files]}]
    enabled = [s for s in recipe.steps.values() if s.enabled]
    for i, step in enumerate(enabled, 1):
        files[f"jobs/{i:02d}-{job_name(recipe, step)}.yaml"] = [step_job(recipe, step, variant, registry, tag)]
        if step.shards > 1:
            files[f"jobs/{i:02d}-{job_name(recipe, step)}-gather.yaml"] = [gather_job(recipe, step, variant, registry, tag)]
    return files


def gather_job(recipe: Recipe, step: Step, variant: str, registry: str | None, tag: str | None) -> dict[str, Any]:
    """`hala gather` of a sharded step as a Job of its own (hala-cli), to apply after the step's Indexed Job when the
    step Jobs are used without the conductor (the conductor gathers in its own process)."""
    args = ["gather", compose_mod.recipe_in_image(recipe), step.name, "--store", _store_url(recipe), "--run", recipe.run,
            *compose_mod.set_args(recipe)]
    container = {"name": "gather", "image": images_mod.reference("cli", variant, registry, tag), "args": args,
                 "resources": _resources("cli", None, "cuda")}
    labels = _labels(recipe, step.name, "gather")
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": k8s_name(f"gather-{step.name}"), "namespace": namespace(recipe), "labels": labels},
            "spec": {
                "backoffLimit": 6,  # exit 75 while a shard is missing: retried with the Job's back-off
                "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", TTL_SECONDS)),
                "podFailurePolicy": {"rules": [
                    {"action": "FailJob", "onExitCodes": {"containerName": "gather", "operator": "In", "values": [EXIT_CONFIG, EXIT_DATA]}},
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]},
                "template": {"metadata": {"labels": labels}, "spec": _pod(recipe, container, None, variant)},
            }}


HEADER = """\
# Generated by `hala render k8s {recipe}{flags} -o {out}` -- do not edit: edit the recipe and render
# again (a test checks that these files equal the rendering). Not run on a cluster here: validated
# offline with kubernetes-validate --strict.
"""


def dump(objects: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(o, sort_keys=False, width=200, allow_unicode=True) for o in objects)


def write(recipe: Recipe, out: str | Path, variant: str = "cuda", registry: str | None = None, tag: str | None = None) -> list[Path]:
    out = Path(out)
    rel = recipe.path.resolve().relative_to(images_mod.REPO) if recipe.path.resolve().is_relative_to(images_mod.REPO) else recipe.path
    flags = f" --variant {variant}" if variant != "cuda" else ""
    head = HEADER.format(recipe=rel, flags=flags, out=out.as_posix())
    written = []
    if (out / "jobs").exists():
        for old in (out / "jobs").glob("*.yaml"):
            old.unlink()  # a step removed from the recipe loses its file
    for fname, objects in render(recipe, variant, registry, tag).items():
        path = out / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + dump(objects), encoding="utf-8")
        written.append(path)
    return written


def text(recipe: Recipe, variant: str = "cuda", registry: str | None = None, tag: str | None = None) -> str:
    files = render(recipe, variant, registry, tag)
    return dump([o for name, objs in files.items() if name != "kustomization.yaml" for o in objs])


# ---------------------------------------------------------------------------------------------------------
# The conductor


class Conflict(Exception):
    """The API refused to create a Job because one with that name exists (HTTP 409)."""


class Jobs(Protocol):
    """The few calls the conductor makes; KubeJobs is the real one."""

    def create(self, job: dict[str, Any]) -> None: ...
    def get(self, name: str) -> dict[str, Any] | None: ...
    def delete(self, name: str) -> None: ...
    def wait(self, seconds: float) -> None: ...


def run_selector(recipe: Recipe) -> str:
    """The label selector of a run's Jobs (every step, shard and gather Job carries these labels)."""
    return f"app.kubernetes.io/part-of={k8s_name(recipe.name)},hala.dev/run={k8s_name(recipe.run)}"


class KubeJobs:
    """Jobs of one namespace through the official client (in-cluster config, else ~/.kube/config, KUBECONFIG)."""

    def __init__(self, ns: str, selector: str | None = None):
        from kubernetes import client, config

        self.selector = selector
        self.version: str | None = None  # the resourceVersion the next watch starts from
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.ns, self.api, self.client = ns, client.BatchV1Api(), client
        self.exc = client.exceptions.ApiException

    def create(self, job: dict[str, Any]) -> None:
        try:
            self.api.create_namespaced_job(self.ns, job)
        except self.exc as e:
            if e.status == 409:
                raise Conflict(job["metadata"]["name"]) from e
            raise

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            job = self.api.read_namespaced_job(name, self.ns)
        except self.exc as e:
            if e.status == 404:
                return None
            raise
        return self.client.ApiClient().sanitize_for_serialization(job)

    def delete(self, name: str) -> None:
        try:
            self.api.delete_namespaced_job(name, self.ns, propagation_policy="Background")
        except self.exc as e:
            if e.status != 404:
                raise

    def wait(self, seconds: float) -> None:
        """Until a Job of the run changes, or `seconds` pass: the watch API, from the last resourceVersion seen, so no
        change between two waits is missed. The conductor reads every Job it follows after each wait, which is the
        resync: a watch the server ends or drops returns at once (after a short pause, so a flapping API server is
        not hammered), and a 410 Gone (a version older than the server keeps) starts again from a fresh list."""
        from kubernetes import watch

        if self.version is None:
            listing = self.api.list_namespaced_job(self.ns, label_selector=self.selector)
            self.version = listing.metadata.resource_version
        w = watch.Watch()
        started = time.monotonic()
        try:
            for event in w.stream(self.api.list_namespaced_job, self.ns, label_selector=self.selector,
                                  resource_version=self.version, timeout_seconds=max(1, int(seconds)),
                                  allow_watch_bookmarks=True):
                self.version = event["object"].metadata.resource_version or self.version
                if event["type"] != "BOOKMARK":
                    return  # a Job was added, changed or deleted: the conductor looks
        except self.exc as e:
            if e.status != 410:
                raise
            self.version = None  # expired: list again next time
        except Exception as e:  # noqa: BLE001 - a dropped connection (urllib3's errors): the next pass resyncs
            logs.get("hala.k8s").info("watch dropped", error=f"{type(e).__name__}: {e}"[:300])
            time.sleep(max(0.0, min(5.0, seconds - (time.monotonic() - started))))
        finally:
            w.stop()


def job_outcome(job: dict[str, Any]) -> tuple[str, str]:
    """('complete' | 'failed' | 'running', reason) from the Job's conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "complete", ""
        if cond.get("type") == "Failed":
            return "failed", f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "running", ""


def conduct(recipe: Recipe, jobs: Jobs, *, variant: str = "cuda", registry: str | None = None, tag: str | None = None,
            resync_seconds: float = 300.0, recipe_arg: str | None = None, store_arg: str | None = None,
            max_polls: int | None = None) -> int:
    """Drive the recipe's enabled steps as Jobs until all are committed, or one fails (exit code != 0)."""
    log = logs.get("hala.k8s")
    store = Store(recipe.store)
    if store.read_json(store.path(recipe.run, "_RUN.json")) is None:
        runner.record(recipe, store, runner_name="k8s")
    steps = [s for s in recipe.steps.values() if s.enabled]
    missing = [f"{s.name} ({s.stage})" for s in steps if s.spec is None]
    if missing:
        raise ConfigError(f"steps whose stage is not built: {', '.join(missing)}")
    state: dict[str, str] = {}
    failure: tuple[str, int, str] | None = None
    polls = 0
    tracked = {s.name for s in steps}
    while True:
        for step in steps:
            if state.get(step.name) in schedule.FINAL:
                continue
            if state.get(step.name) != "running":
                move, _ = schedule.next_move(recipe, step, state, tracked, stopped=failure is not None)
                if move == "blocked":
                    state[step.name] = "blocked"
                if move != "go":
                    continue  # waits for its inputs; after a failure nothing new starts (Jobs running finish)
            try:
                decision, fp, _ = schedule.state(store, recipe, step, forced=False)
            except HalaError as e:
                state[step.name], failure = "failed", (step.name, e.exit_code, str(e))
                continue
            if decision == "cached":
                if state.get(step.name) != "cached":
                    log.info("cached", step=step.name, fingerprint=(fp or "")[:12])
                state[step.name] = "cached"
                continue
            name = job_name(recipe, step)
            job = jobs.get(name)
            if job is not None and (job.get("metadata", {}).get("annotations") or {}).get(FINGERPRINT) != fp:
                # a Job of another run or an older config: not ours to adopt
                log.warning("replacing a stale job", step=step.name, job=name)
                jobs.delete(name)
                job = None
            if job is None:
                try:
                    jobs.create(step_job(recipe, step, variant, registry, tag, fingerprint=fp, recipe_arg=recipe_arg,
                                         store_arg=store_arg))
                    log.info("job created", step=step.name, job=name, shards=step.shards, fingerprint=(fp or "")[:12])
                except Conflict:
                    log.info("job still being deleted", step=step.name, job=name)  # tried again at the next pass
                state[step.name] = "running"
                continue
            if state.get(step.name) != "running":
                log.info("job adopted", step=step.name, job=name)
            state[step.name] = "running"
            outcome, reason = job_outcome(job)
            if outcome == "running":
                continue
            if outcome == "failed":
                statuses = store.read_statuses(recipe.run)
                # the step (or its failed shard) wrote why it stopped into the store: the exit code and the error
                candidates = [statuses.get(step.name, {})] + [v for k, v in sorted(statuses.items())
                                                              if k.startswith(f"{step.name}.shard-") and v.get("exit_code")]
                status = next((c for c in candidates if c.get("exit_code")), {})
                code = int(status.get("exit_code") or 1)
                why = "; ".join(x for x in (reason, status.get("error")) if x)
                state[step.name], failure = "failed", (step.name, code, why or "the Job failed")
                log.error("job failed", step=step.name, job=name, exit_code=code, reason=why)
                continue
            try:
                if step.shards > 1:
                    gather_step(recipe, step.name)
            except HalaError as e:
                state[step.name], failure = "failed", (step.name, e.exit_code, f"gather: {e}")
                continue
            if store.read_manifest(recipe.run, step.name) is None:
                state[step.name], failure = "failed", (step.name, EXIT_CONFIG, "the Job completed but the step left no manifest")
                continue
            state[step.name] = "done"
            log.info("step done", step=step.name, job=name)
        active = [s.name for s in steps if state.get(s.name) == "running"]
        pending = [s.name for s in steps if s.name not in state]
        if failure:
            break  # Jobs still running finish on their own; a rerun adopts them
        if not active and not pending:
            break
        polls += 1
        if max_polls is not None and polls >= max_polls:
            log.info("conductor stopping", after_polls=polls, running=active)
            return EXIT_TEMPORARY  # the caller (a test, or a pod being replaced) comes back and adopts what runs
        jobs.wait(resync_seconds)  # returns when a Job changes (the watch API), at the latest after resync_seconds
    counts: dict[str, int] = {}
    for s in steps:
        counts[state.get(s.name, "not run")] = counts.get(state.get(s.name, "not run"), 0) + 1
    log.info("run end", **counts)
    if failure:
        step_name, code, why = failure
        print(f"hala: step {step_name} failed (exit {code}): {why}", flush=True)
        return code or 1
    return 0
