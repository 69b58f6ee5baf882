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
import subprocess
import time
import urllib.request
from typing import Any

import yaml

from hala.contract import stagespec
from kubeapi import python_for_image

SKIPPED_ENV = {"HOME", "HF_HOME"}


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


def _run_container(template: dict[str, Any], env: dict[str, str], timeout: float) -> tuple[int, str]:
    container = template["container"]
    values = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    child = {**env, **{k: v for k, v in values.items() if k not in SKIPPED_ENV}}
    # the image's ENTRYPOINT (hala.ops.images): `hala-stage STAGE ...` for a step, `hala gather ...` in
    # hala-cli (the echo fixture stage lives in the cli set, so the image alone does not tell)
    step = container["args"][0] in stagespec.all_stages()
    python = python_for_image(container["image"])  # the image's set: its environment here
    cmd = [python, "-m", "hala.ops.launch" if step else "hala.ops.cli", *container["args"]]
    done = subprocess.run(cmd, env=child, capture_output=True, text=True, timeout=timeout)
    return done.returncode, (done.stderr + done.stdout)[-3000:]


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


def run(
    workflow: dict[str, Any],
    api: Any,
    env: dict[str, str],
    timeout: float = 600,
    exits: dict[str, list[int]] | None = None,
    logs: dict[str, str] | None = None,
) -> dict[str, tuple[str, int]]:
    """Every task's phase and number of attempts. `exits`: a task's next attempts end with these codes without
    running (a bad node, a crash), as the stand-in's `exits` do for a Job's pods. `logs` gets each task's last
    output (a container's stderr and stdout, a resource task's outcome)."""
    planned = {k: list(v) for k, v in (exits or {}).items()}
    spec = workflow["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    dag = templates[spec["entrypoint"]]["dag"]["tasks"]
    result: dict[str, tuple[str, int]] = {}
    failed = False
    for task in order(dag):
        if failed or any(result.get(d, ("",))[0] != "Succeeded" for d in task.get("dependencies", [])):
            result[task["name"]] = ("Omitted", 0)
            continue
        template = templates[task["template"]]
        strategy = template.get("retryStrategy") or {}
        attempts, phase = 0, "Failed"
        while True:
            attempts += 1
            if "resource" in template:
                ok, said = _run_resource(template, api, timeout)
                last = {"status": "Succeeded" if ok else "Failed", "exitCode": "0" if ok else "1"}
            else:
                ahead = planned.get(task["name"])
                code, said = (ahead.pop(0), "planned") if ahead else _run_container(template, env, timeout)
                ok = code == 0
                last = {"status": "Succeeded" if ok else "Failed", "exitCode": str(code)}
            if logs is not None:
                logs[task["name"]] = said
            if ok:
                phase = "Succeeded"
                break
            retry = attempts <= int(strategy.get("limit", 0))
            if retry and strategy.get("expression"):
                retry = _expr(strategy["expression"], last)
            if not retry:
                break
        result[task["name"]] = (phase, attempts)
        failed = failed or phase != "Succeeded"
    return result
