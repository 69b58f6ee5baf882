"""Argo Workflows: the recipe's DAG as one Workflow, and the same as a WorkflowTemplate (`hala render argo`).

    hala render argo recipes/hala-paper.yaml -o manifests/hala-paper/argo
    kubectl apply -k manifests/hala-paper/argo/  # namespace, recipe, volume, RBAC, the WorkflowTemplate
    argo submit -n hala-paper --from workflowtemplate/hala-paper-hala-paper
    argo submit -n hala-paper manifests/hala-paper/argo/workflow.yaml  # or the Workflow on its own

Each step is a task running the same step command as every other runner, on its stage's image, with the pod of
the conductor's Job for that step (resources, GPU tolerations, the FP8 teacher's placement, non-root,
read-only root filesystem, the store and its credentials' Secret). A sharded step is a `resource` task that
creates its Indexed Job (the conductor's, so backoffLimitPerIndex, the podFailurePolicy by exit code and the
node placement are the same) and waits on it, then a task runs `hala gather`. Retries are Argo's: exit 75, a
crash or a lost pod is retried with backoff, exit 2 (config) and 3 (bad input) are not. A step that finds its
manifest exits 0 at once, so submitting the workflow again after a failure resumes it, as `hala run` does.

Service accounts: a step's container gets no token (`automountServiceAccountToken: false`); Argo's executor
beside it uses `hala-argo-executor` (task results only), and a resource task `hala-argo-jobs` (Jobs, in this
namespace only). Kueue: with `kubernetes.queue` the Jobs carry its label and are created suspended, and the
step pods carry the label for Kueue's pod integration (hala.ops.kueue renders the queues).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from hala.contract.errors import EXIT_CONFIG, EXIT_DATA
from hala.contract.recipe import Recipe, Step, served_by
from hala.ops import commands, k8s, manifests
from hala.ops import compose as compose_mod

API = "argoproj.io/v1alpha1"
EXECUTOR = "hala-argo-executor"  # Argo's executor of a step's pod: it reports the step's result, nothing else
JOBS = "hala-argo-jobs"  # the executor of a resource task: creates and watches the Job of a sharded step
ENTRY = "hala"
# Job condition types that mean it failed for good. A resource task's conditions are label selectors over the
# Job's JSON (a path with array indexes, no filters), and Argo ORs the requirements of a failureCondition:
# one per position the condition can take (Kueue's Suspended may come first).
FAILED_TYPES = ("FailureTarget", "Failed")
CONDITION_SLOTS = 4


def task_name(step: Step) -> str:
    """A DAG task's name: a DNS label (the step's dots go)."""
    return k8s.k8s_name(step.name)


def retry_strategy(recipe: Recipe, *, by_exit_code: bool) -> dict[str, Any]:
    """Exit 75, a crash or a pod lost to its node: retried with exponential backoff. A step's own exit 2
    (config) or 3 (bad input) will not get better and is not. A resource task sees no exit code of the step
    (an index that exits 2 or 3 fails its Job at once through the podFailurePolicy), so its retries are new
    Jobs, like the conductor's `retries`. One level of retries where the conductor has two (pods of a Job,
    then new Jobs): a step task gets both budgets, pod_retries + retries."""
    pod_retries = int(recipe.kubernetes.get("pod_retries", 2))
    retries = int(recipe.kubernetes.get("retries", 2))
    backoff = {
        "duration": f"{int(float(recipe.kubernetes.get('retry_backoff_seconds', 30)))}s",
        "factor": 2,
        "cap": "10m",
    }
    strategy: dict[str, Any] = {"retryPolicy": "Always", "backoff": backoff}
    if by_exit_code:
        strategy["limit"] = pod_retries + retries
        final = ", ".join(str(c) for c in (EXIT_CONFIG, EXIT_DATA))
        # Error: Argo's own or the pod's (evicted, deleted), no exit code to read
        strategy["expression"] = (
            f'lastRetry.status == "Error" || (lastRetry.status == "Failed" && '
            f"asInt(lastRetry.exitCode) not in [{final}])"
        )
    else:
        strategy["limit"] = retries
    return strategy


def _pod_template(name: str, job: dict[str, Any], *, retry: dict[str, Any]) -> dict[str, Any]:
    """A container template carrying the pod of a Job the conductor would create: its container (named `main`,
    as Argo names it), volumes, security context and placement."""
    pod = job["spec"]["template"]["spec"]
    container = {**pod["containers"][0], "name": "main"}
    template: dict[str, Any] = {
        "name": name,
        "metadata": {"labels": job["spec"]["template"]["metadata"]["labels"]},
        "container": container,
        "volumes": pod["volumes"],
        "securityContext": pod["securityContext"],
        "automountServiceAccountToken": False,
        "retryStrategy": copy.deepcopy(retry),
    }
    for key in ("affinity", "tolerations", "nodeSelector"):
        if key in pod:
            template[key] = pod[key]
    return template


def _scale_template(recipe: Recipe, name: str, replicas: int) -> dict[str, Any]:
    """A resource task that sets a served model's Deployment to `replicas` (a merge patch of its spec)."""
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": k8s.served_name(recipe, name), "namespace": k8s.namespace(recipe)},
        "spec": {"replicas": replicas},
    }
    return {
        "name": f"served-{name}-{'up' if replicas else 'down'}",
        "serviceAccountName": JOBS,
        "automountServiceAccountToken": True,
        "executor": {"serviceAccountName": JOBS},
        "resource": {"action": "patch", "mergeStrategy": "merge", "manifest": manifests.dump([patch])},
        "retryStrategy": retry_strategy(recipe, by_exit_code=False),
    }


def failure_condition() -> str:
    return ",".join(
        f"status.conditions.{i}.type in ({','.join(FAILED_TYPES)})" for i in range(CONDITION_SLOTS)
    )


def _job_template(name: str, job: dict[str, Any], shards: int, recipe: Recipe) -> dict[str, Any]:
    """A resource task: create the step's Indexed Job (a fresh name per attempt: a Job of an earlier
    submission may still be there, kept for its TTL), owned by the workflow, and wait until every index
    succeeded or the Job failed."""
    job = copy.deepcopy(job)
    base = job["metadata"].pop("name")
    job["metadata"]["generateName"] = f"{base[:57].rstrip('-')}-"
    return {
        "name": name,
        "serviceAccountName": JOBS,
        "automountServiceAccountToken": True,  # the resource executor talks to the API server
        "executor": {"serviceAccountName": JOBS},
        "resource": {
            "action": "create",
            "setOwnerReference": True,
            "manifest": manifests.dump([job]),
            "successCondition": f"status.succeeded > {shards - 1}",
            "failureCondition": failure_condition(),
        },
        "retryStrategy": retry_strategy(recipe, by_exit_code=False),
    }


def spec(
    recipe: Recipe,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
    *,
    recipe_arg: str | None = None,
    store_arg: str | None = None,
) -> dict[str, Any]:
    """The WorkflowSpec: one DAG of the enabled steps (edges: the recipe's inputs), its templates, and the
    recipe's kubernetes settings (parallelism, deadline, pod GC, TTL). `recipe_arg`/`store_arg` replace the
    in-image paths (the tests run the tasks on this machine)."""
    enabled = [s for s in recipe.steps.values() if s.enabled]
    names = {s.name for s in enabled}
    tasks: list[dict[str, Any]] = []
    templates: list[dict[str, Any]] = []
    step_retry = retry_strategy(recipe, by_exit_code=True)

    def done(upstream: Step) -> str:
        """The task after which a step's output is committed: a sharded step's is its gather."""
        return f"{task_name(upstream)}-gather" if upstream.shards > 1 else task_name(upstream)

    served = manifests.served_in_use(recipe)
    for name in served:
        # a served model: scaled up once its model's step is committed, down after its last user (and by the
        # exit handler, whatever happened)
        entry = recipe.served[name]
        up = [done(recipe.steps[u]) for u in entry.upstream if u in names]
        tasks.append(
            {
                "name": f"served-{name}-up",
                "template": f"served-{name}-up",
                **({"dependencies": up} if up else {}),
            }
        )
        users = [done(recipe.steps[u]) for u in entry.users if u in names]
        tasks.append(
            {"name": f"served-{name}-down", "template": f"served-{name}-down", "dependencies": sorted(users)}
        )
        templates.append(_scale_template(recipe, name, entry.replicas or 1))
        templates.append(_scale_template(recipe, name, 0))
    for step in enabled:
        name = task_name(step)
        job = k8s.step_job(recipe, step, variant, registry, tag, recipe_arg=recipe_arg, store_arg=store_arg)
        deps = sorted(done(recipe.steps[u]) for u in step.upstream if u in names)
        if served_by(step) in served:
            deps.append(f"served-{served_by(step)}-up")
        task: dict[str, Any] = {"name": name, "template": name}
        if deps:
            task["dependencies"] = deps
        tasks.append(task)
        if step.shards > 1:
            templates.append(_job_template(name, job, step.shards, recipe))
            gather = k8s.gather_job(
                recipe, step, variant, registry, tag, recipe_arg=recipe_arg, store_arg=store_arg
            )
            templates.append(_pod_template(f"{name}-gather", gather, retry=step_retry))
            tasks.append({"name": f"{name}-gather", "template": f"{name}-gather", "dependencies": [name]})
        else:
            templates.append(_pod_template(name, job, retry=step_retry))
    # the run's record first (what `hala status` and the report read), its report last: as compose does
    recipe_in, store = recipe_arg or compose_mod.recipe_in_image(recipe), store_arg or k8s.store_url(recipe)
    record = ["record", recipe_in, "--store", store, "--run", recipe.run, "--runner", "argo"]
    for role, args, after in (
        ("record", [*record, *commands.set_args(recipe)], []),
        ("report", ["report", recipe.run, "--store", store], sorted(done(s) for s in enabled)),
    ):
        job = k8s.cli_job(
            recipe, f"{recipe.run}-{role}", role, role, args, variant, registry, tag, recipe_arg
        )
        templates.append(_pod_template(f"run-{role}", job, retry=step_retry))
        tasks.append(
            {"name": f"run-{role}", "template": f"run-{role}", **({"dependencies": after} if after else {})}
        )
    for task in tasks:
        if not task.get("dependencies") and task["name"] != "run-record":
            task["dependencies"] = ["run-record"]
    out: dict[str, Any] = {
        "entrypoint": ENTRY,
        "automountServiceAccountToken": False,
        "executor": {"serviceAccountName": EXECUTOR},
        "podGC": {"strategy": str(recipe.kubernetes.get("pod_gc", "OnPodSuccess"))},  # failed pods keep logs
        "ttlStrategy": {"secondsAfterCompletion": int(recipe.kubernetes.get("ttl_seconds", k8s.TTL_SECONDS))},
    }
    if served:
        # a failed run leaves no GPU held by a served model
        out["onExit"] = "served-down-all"
        templates.append(
            {
                "name": "served-down-all",
                "steps": [[{"name": f"{n}-down", "template": f"served-{n}-down"} for n in served]],
            }
        )
    if recipe.kubernetes.get("parallelism"):
        out["parallelism"] = int(recipe.kubernetes["parallelism"])
    if recipe.kubernetes.get("active_deadline_seconds"):
        out["activeDeadlineSeconds"] = int(recipe.kubernetes["active_deadline_seconds"])
    out["templates"] = [{"name": ENTRY, "dag": {"tasks": tasks}}, *templates]
    return out


def _workflow_labels(recipe: Recipe) -> dict[str, str]:
    step_only = ("hala.dev/step", "hala.dev/stage")
    return {k: v for k, v in k8s.labels(recipe, "-", "-", queued=False).items() if k not in step_only}


def workflow_name(recipe: Recipe) -> str:
    return k8s.k8s_name(f"{recipe.name}-{recipe.run}")


def workflow(
    recipe: Recipe,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
    **paths: str | None,
) -> dict[str, Any]:
    meta = {
        "generateName": f"{workflow_name(recipe)[:57]}-",
        "namespace": k8s.namespace(recipe),
        "labels": _workflow_labels(recipe),
    }
    return {
        "apiVersion": API,
        "kind": "Workflow",
        "metadata": meta,
        "spec": spec(recipe, variant, registry, tag, **paths),
    }


def workflow_template(
    recipe: Recipe, variant: str = "cuda", registry: str | None = None, tag: str | None = None
) -> dict[str, Any]:
    meta = {
        "name": workflow_name(recipe),
        "namespace": k8s.namespace(recipe),
        "labels": _workflow_labels(recipe),
    }
    return {
        "apiVersion": API,
        "kind": "WorkflowTemplate",
        "metadata": meta,
        "spec": spec(recipe, variant, registry, tag),
    }


def rbac(recipe: Recipe) -> list[dict[str, Any]]:
    """The executor's rights: write its task results (Argo >= 3.4); a resource task's also: its Jobs."""
    results = {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflowtaskresults"],
        "verbs": ["create", "patch"],
    }
    jobs = {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["create", "get", "list", "watch", "patch", "delete"],
    }
    rules = [results, jobs]
    if manifests.served_in_use(recipe):  # the scale tasks of served models
        rules.append({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]})
    return [*manifests.role(recipe, EXECUTOR, [results]), *manifests.role(recipe, JOBS, rules)]


def render(
    recipe: Recipe, variant: str = "cuda", registry: str | None = None, tag: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """File name -> objects: what `kubectl apply -k` installs (kustomization.yaml), and workflow.yaml."""
    files = manifests.common_objects(recipe)
    files["rbac.yaml"] = rbac(recipe)
    for name in manifests.served_in_use(recipe):
        files[f"served/{k8s.k8s_name(name)}.yaml"] = k8s.served_objects(recipe, name, variant, registry, tag)
    files["workflowtemplate.yaml"] = [workflow_template(recipe, variant, registry, tag)]
    order = ["namespace.yaml", "storage.yaml", "recipe.yaml", "rbac.yaml"]
    order += sorted(f for f in files if f.startswith("served/")) + ["workflowtemplate.yaml"]
    files["kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f for f in order if f in files],
        }
    ]
    files["workflow.yaml"] = [workflow(recipe, variant, registry, tag)]  # generateName: `argo submit` it
    return files


HEADER = """\
# Generated by `hala render argo {recipe}{flags} -o {out}` -- do not edit: edit the recipe and render
# again (a test checks that these files equal the rendering). Validated offline against Argo Workflows' CRD
# schema; its tasks were run in DAG order on one machine by the tests, not by an Argo controller.
"""


def write(
    recipe: Recipe,
    out: str | Path,
    variant: str = "cuda",
    registry: str | None = None,
    tag: str | None = None,
) -> list[Path]:
    out = Path(out)
    flags = manifests.render_flags(recipe, variant)
    head = HEADER.format(recipe=manifests.recipe_shown(recipe), flags=flags, out=out.as_posix())
    return manifests.write_files(render(recipe, variant, registry, tag), out, head)
