"""Run a rendered Argo Workflow's tasks on this machine, in the order of its DAG: the rendering checked by
running it, not Argo (no controller runs here).

    result = run(workflow, api, env)   # {task: (phase, attempts)}; phases Succeeded, Failed, Omitted

What it takes from the Workflow, as Argo would: the DAG's tasks and dependencies (a task starts once all its
dependencies succeeded; after a failure nothing new starts, Argo's failFast), each container template's image
arguments, run as the image's ENTRYPOINT runs them (`hala-stage ARGS`, or `hala ARGS` in hala-cli) in the
environment that holds the image's lock (`local/hala-serve:...` -> `.venvs/serve`), with the
template's environment values (HOME and HF_HOME excepted: a pod's are emptyDirs, here the machine's, which
hold the stand-ins' cache), and its retryStrategy: `limit` and the `expression`, evaluated on `lastRetry` as
Argo's expr evaluates it (the subset the rendering uses: ==, !=, in, not in, &&, ||, asInt). A resource
template's manifest is created in the Jobs API stand-in (tests/_lib/kubeapi.py, controller=True, which runs
its pods), and its successCondition and failureCondition are evaluated on the Job's JSON as Argo's executor
evaluates them: label-selector requirements over dotted paths, every success requirement must hold, any
failure one fails it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import yaml

import podrun


def order(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks in an order that respects every dependency (Kahn's algorithm, stable)."""
    done: set[str] = set()
    left = list(tasks)
    out = []
    while left:
        ready = [t for t in left if set(t.get("dependencies", [])) <= done]
        if not ready:
            raise ValueError(f"the DAG has a cycle or a missing task: {[t['name'] for t in left]}")
        for t in ready:
            out.append(t)
            done.add(t["name"])
            left.remove(t)
    return out


def _expr(expression: str, last: dict[str, str]) -> bool:
    """Argo's retry expression (expr-lang) on `lastRetry`, for the operators the rendering uses."""
    text = expression.replace("&&", " and ").replace("||", " or ")
    text = re.sub(r"asInt\(([^)]*)\)", r"int(\1)", text)
    return bool(eval(text, {"__builtins__": {}, "int": int}, {"lastRetry": _Obj(last)}))  # noqa: S307


class _Obj:
    def __init__(self, values: dict[str, str]):
        self.__dict__.update(values)


def _path(obj: Any, key: str) -> tuple[bool, str]:
    """gjson's value at a dotted path (array indexes as numbers), as a string, and whether it exists."""
    for part in key.split("."):
        if isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        elif isinstance(obj, dict) and part in obj:
            obj = obj[part]
        else:
            return False, ""
    return True, obj if isinstance(obj, str) else json.dumps(obj)


def _requirements(selector: str) -> list[tuple[str, str, list[str]]]:
    """A label selector's requirements: (key, operator, values); commas inside parentheses belong to a set."""
    out, depth, term = [], 0, ""
    for ch in selector + ",":
        if ch == "," and depth == 0:
            term = term.strip()
            if term:
                m = re.match(r"^([\w./-]+)\s*(==|=|!=|>|<|\s+notin\s+|\s+in\s+)\s*(.*)$", term)
                if not m:
                    raise ValueError(f"not a label selector requirement: {term!r}")
                key, op, value = m.group(1), m.group(2).strip(), m.group(3).strip()
                values = (
                    [v.strip() for v in value.strip("()").split(",")] if op in ("in", "notin") else [value]
                )
                out.append((key, op, values))
            term = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        term += ch
    return out


def _matches(job: dict[str, Any], key: str, op: str, values: list[str]) -> bool:
    """k8s.io/apimachinery labels.Requirement.Matches over the Job's JSON."""
    has, value = _path(job, key)
    if op in ("=", "==", "in"):
        return has and value in values
    if op in ("!=", "notin"):
        return not has or value not in values
    if not has:
        return False
    try:
        return (int(value) > int(values[0])) if op == ">" else (int(value) < int(values[0]))
    except ValueError:
        return False


def _run_resource(template: dict[str, Any], api: Any, timeout: float) -> tuple[bool, str]:
    resource = template["resource"]
    assert resource["action"] == "create", resource["action"]
    job = yaml.safe_load(resource["manifest"])
    ns = job["metadata"]["namespace"]
    request = urllib.request.Request(
        f"{api.url}/apis/batch/v1/namespaces/{ns}/jobs",
        data=json.dumps(job).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        name = json.loads(answer.read())["metadata"]["name"]
    success = _requirements(resource.get("successCondition", ""))
    failure = _requirements(resource.get("failureCondition", ""))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with urllib.request.urlopen(f"{api.url}/apis/batch/v1/namespaces/{ns}/jobs/{name}", timeout=30) as r:
            current = json.loads(r.read())
        for req in failure:
            if _matches(current, *req):
                return False, f"failure condition {req} held on {name}"
        if all(_matches(current, *req) for req in success):
            return True, name
        time.sleep(0.2)
    return False, f"{name}: neither condition within {timeout} s"


def _pod(template: dict[str, Any]) -> dict[str, Any]:
    """A container template as the pod Argo makes of it: the container, its volumes, the pod's security."""
    return {
        "containers": [template["container"]],
        "volumes": template.get("volumes", []),
        "securityContext": template.get("securityContext", {}),
    }


class Served:
    """The Deployments a Workflow scales (its served models): a `patch` of spec.replicas to n > 0 starts the
    Deployment's pod (one, whatever n: one machine) and waits for its startup probe, as a Deployment becomes
    available; a patch to 0 stops it."""

    def __init__(self, pods: Any, deployments: dict[str, dict[str, Any]], timeout: float):
        self.pods, self.deployments, self.timeout = pods, deployments, timeout
        self.running: dict[str, Any] = {}
        self.history: list[tuple[str, int]] = []
        self.logs: dict[str, str] = {}

    def patch(self, template: dict[str, Any]) -> tuple[bool, str]:
        obj = yaml.safe_load(template["resource"]["manifest"])
        name, replicas = obj["metadata"]["name"], int(obj["spec"]["replicas"])
        if obj["kind"] != "Deployment" or name not in self.deployments:
            return False, f"{obj['kind']} {name}: not a rendered Deployment"
        self.history.append((name, replicas))
        if replicas == 0:
            self.stop(name)
            return True, f"{name} scaled to 0"
        if name in self.running:
            return True, f"{name} already up"
        pod = self.deployments[name]["spec"]["template"]["spec"]
        handle = self.pods.start(pod)
        try:
            seconds = podrun.wait_probe(self.pods, handle, pod, self.timeout)
        except RuntimeError as e:
            return False, str(e)
        self.running[name] = handle
        return True, f"{name} ready in {seconds} s"

    def stop(self, name: str) -> None:
        if name in self.running:
            self.logs[name] = self.pods.stop(self.running.pop(name))

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name)


def run(
    workflow: dict[str, Any],
    api: Any,
    env: dict[str, str],
    timeout: float = 600,
    exits: dict[str, list[int]] | None = None,
    logs: dict[str, str] | None = None,
    pods: Any = None,
    deployments: dict[str, dict[str, Any]] | None = None,
    parallel: int = 1,
    served: Served | None = None,
) -> dict[str, tuple[str, int]]:
    """Every task's phase and number of attempts. `exits`: a task's next attempts end with these codes without
    running (a bad node, a crash), as the stand-in's `exits` do for a Job's pods. `logs` gets each task's last
    output (a container's stderr and stdout, a resource task's outcome). `pods`: how a container runs
    (tests/_lib/podrun.py: Venvs(env), the default, or Docker); `deployments`: the rendered Deployments the
    Workflow scales, by name; `parallel`: tasks at a time, as Argo starts every task whose dependencies
    succeeded (at most the Workflow's `parallelism`). The Workflow's onExit handler runs at the end, whatever
    the outcome."""
    pods = pods or podrun.Venvs(env)
    planned = {k: list(v) for k, v in (exits or {}).items()}
    spec = workflow["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    dag = order(templates[spec["entrypoint"]]["dag"]["tasks"])
    served = served or Served(pods, deployments or {}, timeout)
    lock = threading.Lock()

    def attempt(task: dict[str, Any], template: dict[str, Any]) -> tuple[bool, str, str]:
        if "resource" in template and template["resource"]["action"] == "patch":
            ok, said = served.patch(template)
            return ok, said, "0" if ok else "1"
        if "resource" in template:
            ok, said = _run_resource(template, api, timeout)
            return ok, said, "0" if ok else "1"
        with lock:
            ahead = planned.get(task["name"])
            code = ahead.pop(0) if ahead else None
        if code is not None:
            return code == 0, "planned", str(code)
        code, said = pods.run(_pod(template), timeout=timeout)
        return code == 0, said, str(code)

    def one(task: dict[str, Any]) -> tuple[str, int]:
        template = templates[task["template"]]
        strategy = template.get("retryStrategy") or {}
        attempts = 0
        while True:
            attempts += 1
            ok, said, code = attempt(task, template)
            if logs is not None:
                logs[task["name"]] = said
            if ok:
                return "Succeeded", attempts
            last = {"status": "Failed", "exitCode": code}
            retry = attempts <= int(strategy.get("limit", 0))
            if retry and strategy.get("expression"):
                retry = _expr(strategy["expression"], last)
            if not retry:
                return "Failed", attempts

    result: dict[str, tuple[str, int]] = {}
    try:
        with ThreadPoolExecutor(max(1, parallel)) as workers:
            running: dict[Any, str] = {}
            failed = False
            while len(result) < len(dag):
                for task in dag:  # in DAG order: the first ready ones first
                    name = task["name"]
                    if name in result or name in running.values() or len(running) >= max(1, parallel):
                        continue
                    deps = [result.get(d, ("",))[0] for d in task.get("dependencies", [])]
                    if any(p in ("Failed", "Omitted") for p in deps) or (failed and not running):
                        result[name] = ("Omitted", 0)
                    elif not failed and all(p == "Succeeded" for p in deps):
                        running[workers.submit(one, task)] = name
                if not running:
                    for task in dag:  # failFast: what could not start is omitted
                        result.setdefault(task["name"], ("Omitted", 0))
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    result[name] = future.result()
                    failed = failed or result[name][0] != "Succeeded"
        handler = spec.get("onExit")
        if handler:
            for group in templates[handler].get("steps", []):
                for step in group:
                    one({"name": step["name"], "template": step["template"]})
    finally:
        served.close()
    return {task["name"]: result[task["name"]] for task in dag}
