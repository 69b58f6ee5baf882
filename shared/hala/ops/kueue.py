"""Kueue: the queues a recipe's Jobs are admitted through (`hala render kueue`).

    hala render kueue recipes/hala-paper.yaml -o manifests/hala-paper/kueue
    kubectl apply -k manifests/hala-paper/kueue/  # flavors, ClusterQueue, priority; the LocalQueue
    hala render k8s recipes/hala-paper.yaml --queue hala -o DIR  # Jobs labelled and suspended

What it renders (Kueue v1beta2, the version its CRDs store since v0.15):

- ResourceFlavors by GPU Feature Discovery's compute-capability labels: `gpu-hopper` (9.x) and `gpu-ada`
  (8.9), the two that run FP8 (the teacher's Jobs require compute capability >= 8.9 by node affinity, and
  Kueue only assigns a flavor whose labels satisfy it), `gpu-ampere` (8.0, every other GPU step), and `cpu`
  (nodes without GPUs); the GPU flavors tolerate the usual `nvidia.com/gpu` taint.
- One ClusterQueue whose quotas cover cpu, memory and nvidia.com/gpu in each flavor, `cpu` first, so a step
  without GPUs never takes GPU nodes' quota; the figures are a starting point to edit (`--set` has no say
  here).
- A LocalQueue in the recipe's namespace (the name every Job's `kueue.x-k8s.io/queue-name` label gives), and a
  WorkloadPriorityClass for the run (`kueue.x-k8s.io/priority-class`).

With the conductor: Jobs carry the queue label and are created suspended; Kueue admits (unsuspends) them when
the quota allows, and the conductor just waits longer. With Argo: the same for a sharded step's Job; a step's
pod carries the label for Kueue's pod integration (enable `pod` in Kueue's `integrations.frameworks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hala.contract.recipe import Recipe
from hala.ops import k8s, manifests

API = "kueue.x-k8s.io/v1beta2"
DEFAULT_QUEUE = "hala"
DEFAULT_PRIORITY = "hala-batch"
GPU_TAINT = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
MAJOR, MINOR = "nvidia.com/gpu.compute.major", "nvidia.com/gpu.compute.minor"
# name -> (node labels, tolerations, quota: cpu, memory, GPUs); the first that fits a workload is taken
FLAVORS: dict[str, tuple[dict[str, str], list[dict[str, str]], tuple[str, str, int]]] = {
    "cpu": ({}, [], ("256", "1Ti", 0)),
    "gpu-hopper": ({MAJOR: "9"}, GPU_TAINT, ("256", "2Ti", 16)),
    "gpu-ada": ({MAJOR: "8", MINOR: "9"}, GPU_TAINT, ("128", "1Ti", 8)),
    "gpu-ampere": ({MAJOR: "8", MINOR: "0"}, GPU_TAINT, ("128", "1Ti", 8)),
}


def queue_name(recipe: Recipe) -> str:
    return str(recipe.kubernetes.get("queue") or DEFAULT_QUEUE)


def priority_name(recipe: Recipe) -> str:
    return str(recipe.kubernetes.get("priority_class") or DEFAULT_PRIORITY)


def cluster_queue_name(recipe: Recipe) -> str:
    return k8s.k8s_name(f"hala-{k8s.namespace(recipe)}")


def flavors() -> list[dict[str, Any]]:
    out = []
    for name, (node_labels, tolerations, _) in FLAVORS.items():
        spec: dict[str, Any] = {}
        if node_labels:
            spec["nodeLabels"] = node_labels
        if tolerations:
            spec["tolerations"] = tolerations
        out.append(
            {
                "apiVersion": API,
                "kind": "ResourceFlavor",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "hala"}},
                "spec": spec,
            }
        )
    return out


def cluster_queue(recipe: Recipe) -> dict[str, Any]:
    flavor_quotas = [
        {
            "name": name,
            "resources": [
                {"name": "cpu", "nominalQuota": cpu},
                {"name": "memory", "nominalQuota": memory},
                {"name": "nvidia.com/gpu", "nominalQuota": gpus},
            ],
        }
        for name, (_, _, (cpu, memory, gpus)) in FLAVORS.items()
    ]
    return {
        "apiVersion": API,
        "kind": "ClusterQueue",
        "metadata": {"name": cluster_queue_name(recipe), "labels": {"app.kubernetes.io/name": "hala"}},
        "spec": {
            # only the recipe's namespace submits to it
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": k8s.namespace(recipe)}},
            "queueingStrategy": "BestEffortFIFO",  # a step that does not fit does not hold back smaller ones
            "resourceGroups": [
                {"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": flavor_quotas}
            ],
        },
    }


def local_queue(recipe: Recipe) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LocalQueue",
        "metadata": manifests.meta(recipe, queue_name(recipe)),
        "spec": {"clusterQueue": cluster_queue_name(recipe)},
    }


def priority_class(recipe: Recipe) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "WorkloadPriorityClass",
        "metadata": {"name": priority_name(recipe), "labels": {"app.kubernetes.io/name": "hala"}},
        "value": 100,
        "description": "Hala pipeline steps: batch work, preemptible by interactive and serving workloads",
    }


def render(recipe: Recipe) -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = {
        "namespace.yaml": manifests.common_objects(recipe)["namespace.yaml"],  # the LocalQueue's
        "flavors.yaml": flavors(),
        "clusterqueue.yaml": [cluster_queue(recipe), priority_class(recipe)],
        "localqueue.yaml": [local_queue(recipe)],
    }
    files["kustomization.yaml"] = [
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(files)}
    ]
    return files


HEADER = """\
# Generated by `hala render kueue {recipe} -o {out}` -- do not edit: edit the recipe (or hala/ops/kueue.py's
# quotas) and render again (a test checks that these files equal the rendering). Validated offline against
# Kueue's CRD schemas (v1beta2); not applied to a cluster here.
"""


def write(recipe: Recipe, out: str | Path) -> list[Path]:
    out = Path(out)
    head = HEADER.format(recipe=manifests.recipe_shown(recipe), out=out.as_posix())
    return manifests.write_files(render(recipe), out, head)
