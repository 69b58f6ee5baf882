"""The manifests of a recipe (`hala render k8s`): what `kubectl apply -k` installs to run it with the
conductor, each step's Job on its own, and the YAML and file helpers every rendering for a cluster shares
(hala.ops.argo, hala.ops.kueue).

    hala render k8s recipes/hala-paper.yaml -o manifests/hala-paper     # cuda images, GPUs, FP8 placement
    hala render k8s recipes/tiny.yaml --variant cpu -o manifests/tiny   # cpu images, no GPU
    kubectl apply -k manifests/hala-paper/

What `kubectl apply -k` creates: the namespace, the store's volume claim (ReadWriteMany; an fsspec URL store
such as s3://... needs none), the recipe as a ConfigMap, RBAC for the conductor and the conductor Job. The
conductor (hala-cli image, hala.ops.conductor) creates one Job per step in dependency order and retries failed
ones. `jobs/` holds every step's Job on its own, for per-stage reuse (`kubectl apply -f
manifests/hala-paper/jobs/26-merge-hala-350m.yaml`, and `NN-<step>-gather.yaml` after a sharded one); they are
not in the kustomization.

No cluster ran these manifests here: they are validated offline (kubernetes-validate --strict) and
policy-tested; the conductor is tested through the official client against a stand-in of the Jobs API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hala.contract.errors import EXIT_CONFIG, EXIT_DATA
from hala.contract.recipe import Recipe
from hala.ops import commands, k8s
from hala.ops import compose as compose_mod
from hala.ops import images as images_mod


def conductor_job(recipe: Recipe, variant: str, registry: str | None, tag: str | None) -> dict[str, Any]:
    args = [
        "run",
        compose_mod.recipe_in_image(recipe),
        "--runner",
        "k8s",
        "--store",
        k8s.store_url(recipe),
        "--run",
        recipe.run,
        "--variant",
        variant,
        "--namespace",
        k8s.namespace(recipe),
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
        "resources": k8s.resources_for("cli", None, "cuda"),
    }
    pod = k8s.pod_spec(recipe, container, None, variant, service_account=k8s.CONDUCTOR)
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
            "name": k8s.conductor_name(recipe),
            "namespace": k8s.namespace(recipe),
            "labels": k8s.labels(recipe, "conductor", "cli", queued=False),
        },
        "spec": {
            # a restarted conductor adopts the Jobs it created instead of creating them again
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": int(recipe.kubernetes.get("ttl_seconds", k8s.TTL_SECONDS)),
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
            "template": {
                "metadata": {"labels": k8s.labels(recipe, "conductor", "cli", queued=False)},
                "spec": pod,
            },
        },
    }


def common_objects(recipe: Recipe) -> dict[str, list[dict[str, Any]]]:
    """What every way of running the recipe on a cluster needs: its namespace, the recipe as a ConfigMap (the
    steps mount it), and the store's volume claim where the store is the shared volume."""
    ns = k8s.namespace(recipe)
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
                "metadata": meta(recipe, "hala-recipe"),
                "data": {recipe.path.name: recipe.path.read_text(encoding="utf-8")},
            }
        ],
    }
    if k8s.store_url(recipe) == k8s.STORE_MOUNT:
        pvc: dict[str, Any] = {
            "accessModes": ["ReadWriteMany"],  # every step's pod, on any node, reads and writes it
            "resources": {"requests": {"storage": str(recipe.kubernetes.get("storage", "100Gi"))}},
        }
        if recipe.kubernetes.get("storage_class"):
            pvc["storageClassName"] = recipe.kubernetes["storage_class"]
        files["storage.yaml"] = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": meta(recipe, "hala-store"),
                "spec": pvc,
            }
        ]
    return files


def served_in_use(recipe: Recipe) -> list[str]:
    """The served models some enabled step sends requests to (one nobody uses is not deployed)."""
    return [
        name
        for name, entry in recipe.served.items()
        if any(recipe.steps[u].enabled for u in entry.users if u in recipe.steps)
    ]


def meta(recipe: Recipe, name: str) -> dict[str, Any]:
    """Metadata of an object the rendering owns in the recipe's namespace."""
    return {"name": name, "namespace": k8s.namespace(recipe), "labels": {"app.kubernetes.io/name": "hala"}}


def role(recipe: Recipe, name: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ServiceAccount with exactly these rights in the recipe's namespace: its Role and RoleBinding."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(recipe, name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(recipe, name),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(recipe, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": k8s.namespace(recipe)}],
        },
    ]


def base_objects(
    recipe: Recipe, variant: str, registry: str | None, tag: str | None
) -> dict[str, list[dict[str, Any]]]:
    files = common_objects(recipe)
    files["rbac.yaml"] = role(
        recipe,
        k8s.CONDUCTOR,
        [
            {
                "apiGroups": ["batch"],
                "resources": ["jobs"],
                "verbs": ["create", "get", "list", "watch", "delete"],
            },
            {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
            # served models: scaled up for their first user, to zero after the last
            *(
                [
                    {
                        "apiGroups": ["apps"],
                        "resources": ["deployments/scale"],
                        "verbs": ["get", "patch", "update"],
                    }
                ]
                if served_in_use(recipe)
                else []
            ),
        ],
    )
    for name in served_in_use(recipe):
        files[f"served/{k8s.k8s_name(name)}.yaml"] = k8s.served_objects(recipe, name, variant, registry, tag)
    files["conductor.yaml"] = [conductor_job(recipe, variant, registry, tag)]
    return files


def render(
    recipe: Recipe, variant: str = "cuda", registry: str | None = None, tag: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """File name -> objects: the base files, kustomization.yaml and jobs/NN-<step>.yaml."""
    files = base_objects(recipe, variant, registry, tag)
    order = ["namespace.yaml", "storage.yaml", "recipe.yaml", "rbac.yaml"]
    order += sorted(f for f in files if f.startswith("served/")) + ["conductor.yaml"]
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
        files[f"jobs/{i:02d}-{k8s.k8s_name(step.name)}.yaml"] = [
            k8s.step_job(recipe, step, variant, registry, tag)
        ]
        if step.shards > 1:
            files[f"jobs/{i:02d}-{k8s.k8s_name(step.name)}-gather.yaml"] = [
                k8s.gather_job(recipe, step, variant, registry, tag)
            ]
    return files


HEADER = """\
# Generated by `hala render k8s {recipe}{flags} -o {out}` -- do not edit: edit the recipe and render
# again (a test checks that these files equal the rendering). Not run on a cluster here: validated
# offline with kubernetes-validate --strict.
"""


class _Dumper(yaml.SafeDumper):
    """YAML as people write manifests: no anchors for objects used twice (a Job's labels in its metadata and
    its pod template), and text of several lines (a recipe, a Job inside an Argo resource template) as a
    block."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _text)


def dump(objects: list[dict[str, Any]]) -> str:
    return "---\n".join(
        yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True) for o in objects
    )


def recipe_shown(recipe: Recipe) -> str:
    """The recipe's path as a header names it: relative to the repository when it is inside."""
    path = recipe.path.resolve()
    return str(path.relative_to(images_mod.REPO) if path.is_relative_to(images_mod.REPO) else recipe.path)


def render_flags(recipe: Recipe, variant: str, default_variant: str = "cuda") -> str:
    """The `hala render` flags that reproduce a rendering: the variant when not the default, the Kueue
    queue."""
    flags = f" --variant {variant}" if variant != default_variant else ""
    return flags + (f" --queue {recipe.kubernetes['queue']}" if recipe.kubernetes.get("queue") else "")


def write_files(files: dict[str, list[dict[str, Any]]], out: Path, head: str) -> list[Path]:
    written = []
    for fname, objects in files.items():
        path = out / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + dump(objects), encoding="utf-8")
        written.append(path)
    return written


def write(
    recipe: Recipe,
    out: str | Path,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
) -> list[Path]:
    out = Path(out)
    head = HEADER.format(recipe=recipe_shown(recipe), flags=render_flags(recipe, variant), out=out.as_posix())
    if (out / "jobs").exists():
        for old in (out / "jobs").glob("*.yaml"):
            old.unlink()  # a step removed from the recipe loses its file
    return write_files(render(recipe, variant, registry, tag), out, head)
