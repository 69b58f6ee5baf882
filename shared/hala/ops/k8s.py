"""Kubernetes objects of a recipe's steps: their names and labels, the pod every runner on a cluster gives a
step (image, command, resources, GPU placement, security context, volumes), a step's Job and a sharded step's
gather Job. The files made of them are hala.ops.manifests (`hala render k8s`) and hala.ops.argo; the conductor
that creates the Jobs is hala.ops.conductor.

Every name carries the run (`<run>-<step>`, `hala-conductor-<run>`), so two runs of one recipe live side by
side in a namespace.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from hala.contract.errors import EXIT_CONFIG, EXIT_DATA, ConfigError
from hala.contract.recipe import Recipe, Step, served_by, served_url_env
from hala.ops import commands
from hala.ops import compose as compose_mod
from hala.ops import images as images_mod
from hala.ops.resources import FP8_MIN_CAPABILITY, Needs, needs, served_needs

STORE_MOUNT = compose_mod.STORE_IN_IMAGE
UID = 1000
CONDUCTOR = "hala-conductor"
# optional: `kubectl create secret generic hala-hf-token --from-literal=token=hf_...`
HF_SECRET = "hala-hf-token"
STORE_SECRET = "hala-store-credentials"  # optional: env for an object store (AWS_ACCESS_KEY_ID, ...)
FINGERPRINT = "hala.dev/fingerprint"
TTL_SECONDS = 7 * 24 * 3600
# requests = limits per stage and GPU (a GPU step gets them times its GPUs); resources in the recipe win
DEFAULTS = {
    "prepare": ("2", "8Gi"),
    "merge": ("4", "64Gi"),
    "publish": ("1", "4Gi"),
    "cli": ("1", "2Gi"),
    "gpu": ("8", "96Gi"),
}
TINY_DEFAULT = ("2", "8Gi")


def k8s_name(text: str) -> str:
    """A DNS label (Indexed Job pods take the Job's name as hostname): dots and capitals go, 63 characters at
    most."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if len(name) > 63:
        name = f"{name[:54].rstrip('-')}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


def namespace(recipe: Recipe) -> str:
    default = recipe.name if recipe.name.startswith("hala") else f"hala-{recipe.name}"
    return str(recipe.kubernetes.get("namespace") or k8s_name(default))


def job_name(recipe: Recipe, step: Step) -> str:
    """`<run>-<step>`: a Job named after its step alone was adopted by the next run of the recipe in the
    namespace."""
    return k8s_name(f"{recipe.run}-{step.name}")


def conductor_name(recipe: Recipe) -> str:
    return k8s_name(f"{CONDUCTOR}-{recipe.run}")


def labels(recipe: Recipe, step: str, stage: str, *, queued: bool = True) -> dict[str, str]:
    """A step's labels: the run, step and stage; with `kubernetes.queue`, Kueue's queue (and priority class)
    labels, which make Kueue admit the workload into that LocalQueue (`queued=False`: the conductor, a small
    pod that must not hold quota while it waits on the steps)."""
    out = {
        "app.kubernetes.io/name": "hala",
        "app.kubernetes.io/part-of": k8s_name(recipe.name),
        "hala.dev/run": k8s_name(recipe.run),
        "hala.dev/step": k8s_name(step),
        "hala.dev/stage": stage,
    }
    if queued and recipe.kubernetes.get("queue"):
        out["kueue.x-k8s.io/queue-name"] = str(recipe.kubernetes["queue"])
        if recipe.kubernetes.get("priority_class"):
            out["kueue.x-k8s.io/priority-class"] = str(recipe.kubernetes["priority_class"])
    return out


def queued(recipe: Recipe) -> bool:
    """Jobs go through Kueue: created suspended, so nothing starts before Kueue admits them (its webhook
    suspends them too, where it runs; a cluster without it would start them at once)."""
    return bool(recipe.kubernetes.get("queue"))


# an object store's URL as it is, else the volume at /store (one rule for both)
store_url = compose_mod.store_url


def _env(recipe: Recipe, variant: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HALA_LOG_FORMAT", "value": "json"},
        {"name": "HOME", "value": "/home/app"},
        {"name": "HF_HOME", "value": "/home/app/.cache/huggingface"},
        # the token of a gated model (the teacher) from a Secret, if there is one; never written here
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": "token", "optional": True}},
        },
    ]
    if variant == "cpu":
        env += [
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "HF_DATASETS_OFFLINE", "value": "1"},
            {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
        ]
    return env


def pod_spec(
    recipe: Recipe,
    container: dict[str, Any],
    need: Needs | None,
    variant: str,
    service_account: str | None = None,
    recipe_arg: str | None = None,
) -> dict[str, Any]:
    """Pod spec shared by step Jobs and the conductor: non-root, nothing escalates, read-only root, writable
    paths as emptyDir, the store and the recipe mounted (over the baked copy, beside its samples)."""
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": "/home/app"},
        {
            "name": "recipe",
            "mountPath": recipe_arg or compose_mod.recipe_in_image(recipe),
            "subPath": recipe.path.name,
            "readOnly": True,
        },
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
        {"name": "recipe", "configMap": {"name": "hala-recipe"}},
    ]
    if store_url(recipe) == STORE_MOUNT:
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
        securityContext={
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    )
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
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
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": [str(major)]}
                        ]
                    },
                    {
                        "matchExpressions": [
                            {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": [str(major)]},
                            {
                                "key": "nvidia.com/gpu.compute.minor",
                                "operator": "Gt",
                                "values": [str(minor - 1)],
                            },
                        ]
                    },
                ]
            }
        }
    }


def resources_for(step_stage: str, need: Needs | None, variant: str) -> dict[str, Any]:
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


def step_job(
    recipe: Recipe,
    step: Step,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
    fingerprint: str | None = None,
    recipe_arg: str | None = None,
    store_arg: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One step's Job. The conductor passes the fingerprint (adoption after a restart compares it), the
    attempt's annotations and, in the tests, the paths it runs with; rendered files carry the in-image
    paths."""
    if step.spec is None:
        raise ConfigError(f"step '{step.name}': stage '{step.stage}' is not built yet, so it has no image")
    need = needs(recipe, step)
    if variant == "cpu":
        need = Needs(gpus=0, fp8=False, cpu=need.cpu, memory=need.memory, shm=need.shm)
    args = commands.image_args(
        recipe, step, None, store_arg or store_url(recipe), recipe_arg or compose_mod.recipe_in_image(recipe)
    )
    container = {
        "name": "step",
        "image": images_mod.reference(step.spec.env, variant, registry, tag),
        "args": args,
        "resources": resources_for(step.stage, need, variant),
    }
    pod = pod_spec(recipe, container, need, variant, recipe_arg=recipe_arg)
    uses = served_by(step)
    if uses is not None:  # a CPU client of the served model's Service
        container["env"].append({"name": served_url_env(uses), "value": served_url(recipe, uses)})
    # pods of one Job; `retries` is new Jobs (the conductor)
    retries = int(recipe.kubernetes.get("pod_retries", 2))
    spec: dict[str, Any] = {"suspend": True} if queued(recipe) else {}
    if step.shards > 1:
        # an Indexed Job: hala.contract.step reads JOB_COMPLETION_INDEX as the shard; each index retries on
        # its own, and one index that fails for good fails the step (gather needs every part)
        spec.update(
            completionMode="Indexed",
            completions=step.shards,
            parallelism=int(step.resources.get("parallelism", step.shards)),
            backoffLimitPerIndex=retries,
            maxFailedIndexes=0,
        )
    else:
        spec["backoffLimit"] = retries
    spec.update(
        {
            "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", TTL_SECONDS)),
            "podFailurePolicy": {
                "rules": [
                    # exit 2 (config) and 3 (bad input) will not get better by retrying; exit 75 and crashes
                    # retry
                    {
                        "action": "FailIndex" if step.shards > 1 else "FailJob",
                        "onExitCodes": {
                            "containerName": "step",
                            "operator": "In",
                            "values": [EXIT_CONFIG, EXIT_DATA],
                        },
                    },
                    # preemption, eviction, node drain: not the step's failure, not counted against its
                    # retries
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {"metadata": {"labels": labels(recipe, step.name, step.stage)}, "spec": pod},
        }
    )
    meta: dict[str, Any] = {
        "name": job_name(recipe, step),
        "namespace": namespace(recipe),
        "labels": labels(recipe, step.name, step.stage),
    }
    if fingerprint or annotations:
        meta["annotations"] = {**({FINGERPRINT: fingerprint} if fingerprint else {}), **(annotations or {})}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def gather_job(
    recipe: Recipe,
    step: Step,
    variant: str,
    registry: str | None,
    tag: str | None,
    recipe_arg: str | None = None,
    store_arg: str | None = None,
) -> dict[str, Any]:
    """`hala gather` of a sharded step as a Job of its own (hala-cli), to apply after the step's Indexed Job
    when the step Jobs are used without the conductor (the conductor gathers in its own process; an Argo
    Workflow runs this pod as the task after the Job)."""
    args = [
        "gather",
        recipe_arg or compose_mod.recipe_in_image(recipe),
        step.name,
        "--store",
        store_arg or store_url(recipe),
        "--run",
        recipe.run,
        *commands.set_args(recipe),
    ]
    return cli_job(
        recipe,
        f"{recipe.run}-gather-{step.name}",
        step.name,
        "gather",
        args,
        variant,
        registry,
        tag,
        recipe_arg,
    )


def cli_job(
    recipe: Recipe,
    name: str,
    step: str,
    role: str,
    args: list[str],
    variant: str,
    registry: str | None,
    tag: str | None,
    recipe_arg: str | None = None,
) -> dict[str, Any]:
    """A `hala` command of the run (gather, record, report) as a Job of the hala-cli image, labelled as the
    step it serves with `role` as its stage."""
    container = {
        "name": role,
        "image": images_mod.reference("cli", variant, registry, tag),
        "args": args,
        "resources": resources_for("cli", None, "cuda"),
    }
    job_labels = labels(recipe, step, role)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": k8s_name(name), "namespace": namespace(recipe), "labels": job_labels},
        "spec": {
            **({"suspend": True} if queued(recipe) else {}),
            "backoffLimit": 6,  # exit 75 while a shard is missing: retried with the Job's back-off
            "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", TTL_SECONDS)),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": role,
                            "operator": "In",
                            "values": [EXIT_CONFIG, EXIT_DATA],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": job_labels},
                "spec": pod_spec(recipe, container, None, variant, recipe_arg=recipe_arg),
            },
        },
    }


# --- served models: a Deployment behind a Service
# -----------------------------------------------------------------------------------------------------------

SERVED_PORT = 8000  # the container's port; the Service's is the recipe's


def served_name(recipe: Recipe, name: str) -> str:
    """`served-<run>-<name>`: the Deployment and its Service, one per run (two runs side by side)."""
    return k8s_name(f"served-{recipe.run}-{name}")


def served_url(recipe: Recipe, name: str) -> str:
    return f"http://{served_name(recipe, name)}.{namespace(recipe)}.svc:{recipe.served[name].port}/v1"


def served_objects(
    recipe: Recipe,
    name: str,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
    recipe_arg: str | None = None,
    store_arg: str | None = None,
) -> list[dict[str, Any]]:
    """The served model's Deployment (created at 0 replicas: the conductor scales it to the recipe's replicas
    when the first step that uses it starts, and back to 0 after the last) and its ClusterIP Service. Its pod
    is the steps' pod (non-root, read-only root, the store and recipe mounted, FP8 placement for an FP8
    teacher), running `python -m hala.ops.served`, ready once /v1/models answers. `recipe_arg` and
    `store_arg` as for step_job."""
    entry = recipe.served[name]
    users = [recipe.steps[u] for u in entry.users if u in recipe.steps]
    if not users or users[0].spec is None:
        raise ConfigError(f"served '{name}': no step uses it, so it has no image")
    need = served_needs(recipe, name)
    if variant == "cpu":
        need = Needs(gpus=0, fp8=False, cpu=need.cpu, memory=need.memory, shm=need.shm)
    recipe_in = recipe_arg or compose_mod.recipe_in_image(recipe)
    store = store_arg or store_url(recipe)
    args = commands.served_args(recipe, name, store, recipe_in, host="0.0.0.0", port=SERVED_PORT)
    probe = {"httpGet": {"path": "/v1/models", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container = {
        "name": "server",
        "image": images_mod.reference(users[0].spec.env, variant, registry, tag),
        "command": ["python", "-m", "hala.ops.served"],
        "args": args,
        "ports": [{"name": "http", "containerPort": SERVED_PORT}],
        "resources": resources_for("serve", need, variant),
        # loading weights and compiling take minutes: liveness starts counting once this has passed
        "startupProbe": {**probe, "failureThreshold": max(1, int(entry.ready_seconds // 10))},
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": 6},
    }
    pod = pod_spec(recipe, container, need, variant, recipe_arg=recipe_arg)
    pod["restartPolicy"] = "Always"  # a Deployment's pods
    pod_labels = {
        **labels(recipe, f"served-{name}", "serve", queued=False),
        "hala.dev/served": k8s_name(name),
    }
    selector = {"hala.dev/run": pod_labels["hala.dev/run"], "hala.dev/served": pod_labels["hala.dev/served"]}
    meta = {"name": served_name(recipe, name), "namespace": namespace(recipe), "labels": pod_labels}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**meta, "annotations": {"hala.dev/replicas": str(entry.replicas)}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": selector},
                "template": {"metadata": {"labels": pod_labels}, "spec": pod},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "type": "ClusterIP",
                "selector": selector,
                "ports": [{"name": "http", "port": entry.port, "targetPort": "http", "protocol": "TCP"}],
            },
        },
    ]
