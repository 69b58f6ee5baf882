"""Kubernetes: the manifests of a recipe (`hala render k8s`); the conductor that runs them is
hala.ops.conductor.

    hala render k8s recipes/hala-paper.yaml -o manifests/hala-paper     # cuda images, GPUs, FP8 placement
    hala render k8s recipes/tiny.yaml --variant cpu -o manifests/tiny   # cpu images, no GPU
    kubectl apply -k manifests/hala-paper/

What `kubectl apply -k` creates: the namespace, the store's volume claim (ReadWriteMany; an fsspec URL
store such as s3://... needs none), the recipe as a ConfigMap, RBAC for the conductor and the conductor
Job. The conductor (hala-cli image, hala.ops.conductor) creates one Job per step in dependency order and
retries failed ones. Every name carries the run (`<run>-<step>`, `hala-conductor-<run>`), so two runs of one
recipe live side by side in a namespace (`hala render k8s ... --run b`). `jobs/` holds every step's Job on its
own, for per-stage reuse (`kubectl apply -f manifests/hala-paper/jobs/26-merge-hala-350m.yaml`, and
`NN-<step>-gather.yaml` after a sharded one); they are not in the kustomization.

No cluster ran these manifests here: they are validated offline (kubernetes-validate --strict) and
policy-tested; the conductor is tested through the official client against a stand-in of the Jobs API.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from hala.contract.errors import EXIT_CONFIG, EXIT_DATA, ConfigError
from hala.contract.recipe import Recipe, Step
from hala.ops import commands
from hala.ops import compose as compose_mod
from hala.ops import images as images_mod
from hala.ops.resources import FP8_MIN_CAPABILITY, Needs, needs

STORE_MOUNT = compose_mod.STORE_IN_IMAGE
UID = 1000
CONDUCTOR = "hala-conductor"
HF_SECRET = (
    "hala-hf-token"  # optional: `kubectl create secret generic hala-hf-token --from-literal=token=hf_...`
)
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


def _labels(recipe: Recipe, step: str, stage: str) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "hala",
        "app.kubernetes.io/part-of": k8s_name(recipe.name),
        "hala.dev/run": k8s_name(recipe.run),
        "hala.dev/step": k8s_name(step),
        "hala.dev/stage": stage,
    }
    if recipe.kubernetes.get("queue"):
        labels["kueue.x-k8s.io/queue-name"] = str(
            recipe.kubernetes["queue"]
        )  # Kueue admits the Job into this queue
    return labels


_store_url = (
    compose_mod.store_url
)  # an object store's URL as it is, else the volume at /store (one rule for both)


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


def _pod(
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
        recipe, step, None, store_arg or _store_url(recipe), recipe_arg or compose_mod.recipe_in_image(recipe)
    )
    container = {
        "name": "step",
        "image": images_mod.reference(step.spec.env, variant, registry, tag),
        "args": args,
        "resources": _resources(step.stage, need, variant),
    }
    pod = _pod(recipe, container, need, variant, recipe_arg=recipe_arg)
    retries = int(
        recipe.kubernetes.get("pod_retries", 2)
    )  # pods of one Job; `retries` is new Jobs (the conductor)
    spec: dict[str, Any] = {}
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
            "template": {"metadata": {"labels": _labels(recipe, step.name, step.stage)}, "spec": pod},
        }
    )
    meta: dict[str, Any] = {
        "name": job_name(recipe, step),
        "namespace": namespace(recipe),
        "labels": _labels(recipe, step.name, step.stage),
    }
    if fingerprint or annotations:
        meta["annotations"] = {**({FINGERPRINT: fingerprint} if fingerprint else {}), **(annotations or {})}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def conductor_job(recipe: Recipe, variant: str, registry: str | None, tag: str | None) -> dict[str, Any]:
    args = [
        "run",
        compose_mod.recipe_in_image(recipe),
        "--runner",
        "k8s",
        "--store",
        _store_url(recipe),
        "--run",
        recipe.run,
        "--variant",
        variant,
        "--namespace",
        namespace(recipe),
        *commands.set_args(recipe),
    ]
    if registry:
        args += ["--registry", registry]
    if tag:
        args += ["--tag", tag]
    container = {
        "name": "conductor",
        "image": images_mod.reference("cli", variant, registry, tag),
        "args": args,
        "resources": _resources("cli", None, "cuda"),
    }
    pod = _pod(recipe, container, None, variant, service_account=CONDUCTOR)
    # the conductor Job's uid (its pods carry it as a label): a retried pod of this Job is the same conductor,
    # one of a Job applied again is a new one (hala.ops.conductor: only a new one retries a run's failed
    # steps)
    container["env"].append(
        {
            "name": "HALA_CONDUCTOR_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}},
        }
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": conductor_name(recipe),
            "namespace": namespace(recipe),
            "labels": _labels(recipe, "conductor", "cli"),
        },
        "spec": {
            # a restarted conductor adopts the Jobs it created instead of creating them again
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", TTL_SECONDS)),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "conductor",
                            "operator": "In",
                            "values": [EXIT_CONFIG, EXIT_DATA],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {"metadata": {"labels": _labels(recipe, "conductor", "cli")}, "spec": pod},
        },
    }


def base_objects(
    recipe: Recipe, variant: str, registry: str | None, tag: str | None
) -> dict[str, list[dict[str, Any]]]:
    ns = namespace(recipe)

    def meta(name: str) -> dict[str, Any]:
        return {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": "hala"}}

    files: dict[str, list[dict[str, Any]]] = {
        "namespace.yaml": [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"app.kubernetes.io/name": "hala"}},
            }
        ],
        "recipe.yaml": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta("hala-recipe"),
                "data": {recipe.path.name: recipe.path.read_text(encoding="utf-8")},
            }
        ],
        "rbac.yaml": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(CONDUCTOR)},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta(CONDUCTOR),
                "rules": [
                    {
                        "apiGroups": ["batch"],
                        "resources": ["jobs"],
                        "verbs": ["create", "get", "list", "watch", "delete"],
                    },
                    {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": meta(CONDUCTOR),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONDUCTOR},
                "subjects": [{"kind": "ServiceAccount", "name": CONDUCTOR, "namespace": ns}],
            },
        ],
        "conductor.yaml": [conductor_job(recipe, variant, registry, tag)],
    }
    if _store_url(recipe) == STORE_MOUNT:
        pvc: dict[str, Any] = {
            "accessModes": ["ReadWriteMany"],  # every step's pod, on any node, reads and writes it
            "resources": {"requests": {"storage": str(recipe.kubernetes.get("storage", "100Gi"))}},
        }
        if recipe.kubernetes.get("storage_class"):
            pvc["storageClassName"] = recipe.kubernetes["storage_class"]
        files["storage.yaml"] = [
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta("hala-store"), "spec": pvc}
        ]
    return files


def render(
    recipe: Recipe, variant: str = "cuda", registry: str | None = None, tag: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """File name -> objects: the base files, kustomization.yaml and jobs/NN-<step>.yaml."""
    files = base_objects(recipe, variant, registry, tag)
    order = ["namespace.yaml", "storage.yaml", "recipe.yaml", "rbac.yaml", "conductor.yaml"]
    files["kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f for f in order if f in files],
        }
    ]
    enabled = [s for s in recipe.steps.values() if s.enabled]
    for i, step in enumerate(enabled, 1):
        # files are named after the step (a stable path to apply one stage); the Jobs in them, after run and
        # step
        files[f"jobs/{i:02d}-{k8s_name(step.name)}.yaml"] = [step_job(recipe, step, variant, registry, tag)]
        if step.shards > 1:
            files[f"jobs/{i:02d}-{k8s_name(step.name)}-gather.yaml"] = [
                gather_job(recipe, step, variant, registry, tag)
            ]
    return files


def gather_job(
    recipe: Recipe, step: Step, variant: str, registry: str | None, tag: str | None
) -> dict[str, Any]:
    """`hala gather` of a sharded step as a Job of its own (hala-cli), to apply after the step's Indexed Job
    when the step Jobs are used without the conductor (the conductor gathers in its own process)."""
    args = [
        "gather",
        compose_mod.recipe_in_image(recipe),
        step.name,
        "--store",
        _store_url(recipe),
        "--run",
        recipe.run,
        *commands.set_args(recipe),
    ]
    container = {
        "name": "gather",
        "image": images_mod.reference("cli", variant, registry, tag),
        "args": args,
        "resources": _resources("cli", None, "cuda"),
    }
    labels = _labels(recipe, step.name, "gather")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": k8s_name(f"{recipe.run}-gather-{step.name}"),
            "namespace": namespace(recipe),
            "labels": labels,
        },
        "spec": {
            "backoffLimit": 6,  # exit 75 while a shard is missing: retried with the Job's back-off
            "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", TTL_SECONDS)),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "gather",
                            "operator": "In",
                            "values": [EXIT_CONFIG, EXIT_DATA],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": _pod(recipe, container, None, variant)},
        },
    }


HEADER = """\
# Generated by `hala render k8s {recipe}{flags} -o {out}` -- do not edit: edit the recipe and render
# again (a test checks that these files equal the rendering). Not run on a cluster here: validated
# offline with kubernetes-validate --strict.
"""


def dump(objects: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(o, sort_keys=False, width=200, allow_unicode=True) for o in objects)


def write(
    recipe: Recipe,
    out: str | Path,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
) -> list[Path]:
    out = Path(out)
    rel = (
        recipe.path.resolve().relative_to(images_mod.REPO)
        if recipe.path.resolve().is_relative_to(images_mod.REPO)
        else recipe.path
    )
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
