"""A stand-in for the Kubernetes API server's Jobs, on 127.0.0.1 only, for the conductor and `hala cancel`.

It serves what hala.ops.conductor asks through the official client, in one namespace:

    POST   /apis/batch/v1/namespaces/NS/jobs          create (409 AlreadyExists when the name is taken)
    GET    /apis/batch/v1/namespaces/NS/jobs/NAME     read (404 NotFound)
    DELETE /apis/batch/v1/namespaces/NS/jobs/NAME     delete (the object goes at once: propagation Background)
    GET    /apis/batch/v1/namespaces/NS/jobs          list, with an equality labelSelector (a=b,c=d)
    GET    ...jobs?watch=true&resourceVersion=V&timeoutSeconds=T   the changes after V as JSON lines; it waits
           for the next change up to T seconds, or answers an ERROR event with code 410 (Expired) when V is
           older than the versions it keeps, as an API server does once etcd compacted them.

With `controller=True` it is also the Job controller and the kubelet: every Job created is run in a thread,
its pods as local processes (`python -m hala.ops.launch` with the container's args, JOB_COMPLETION_INDEX per
index of an Indexed Job; with `pods`, tests/_lib/podrun.py's runner: the container as rendered, in Docker
too), each pod retried up to the Job's backoffLimit (backoffLimitPerIndex) unless the podFailurePolicy fails
the Job (or the index) on its exit code, then the Complete or Failed condition set with its
lastTransitionTime. `exits` lets a test make the next pods of a Job exit with given codes instead of
running (a bad node, a crash). The test can also make changes (`change(name)`) and forget history
(`forget()`); every request is recorded as "METHOD path". The server stops after `max_requests` requests or
`seconds`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from bounded import Bounded
from podrun import python_for_image

REPO = Path(__file__).resolve().parents[2]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _job(name: str, ns: str, version: int) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": str(version)},
        "spec": {"template": {"spec": {"containers": [{"name": "step"}]}}},
        "status": {},
    }


def _ranges(indexes: range) -> str:
    """Job status's index notation for consecutive indexes ("0-2", "0", or "")."""
    if not indexes:
        return ""
    return str(indexes[0]) if len(indexes) == 1 else f"{indexes[0]}-{indexes[-1]}"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class KubeAPI(Bounded):
    def __init__(
        self,
        ns: str = "hala",
        max_requests: int = 200,
        seconds: float = 120.0,
        controller: bool = False,
        pods: Any = None,
    ):
        self.ns = ns
        # how the controller runs a pod: tests/_lib/podrun.py's Venvs or Docker (the container's own
        # environment, volumes and Secrets); None: this process's environment, the container's args only
        self.pod_runner = pods
        self.version = 5
        self.oldest = 0  # watches from before this version get 410 Gone
        self.events: list[tuple[int, str]] = []  # (version, job name)
        self.changed = threading.Condition()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.controller = controller
        # job name -> exit codes its next pods end with, without running
        self.exits: dict[str, list[int]] = {}
        self.pods: list[tuple[str, int | None, int]] = []  # (job, index, exit code) of every pod run
        self.runners: list[threading.Thread] = []
        self.scales: list[tuple[str, int]] = []  # (deployment, replicas) of every scale patch, in order
        api = self
        base = f"/apis/batch/v1/namespaces/{ns}/jobs"

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: dict[str, Any]) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

            def _name(self) -> str | None:
                path = urlparse(self.path).path
                return path[len(base) + 1 :] if path.startswith(base + "/") else None

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                api.requests.append(f"GET {self.path}")
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                name = self._name()
                if name is not None:
                    with api.changed:
                        job = copy.deepcopy(api.jobs.get(name))
                    if job is None:
                        self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
                    else:
                        self._send(200, job)
                    return
                if url.path != base:
                    self.send_error(404)
                    return
                if query.get("watch", "").lower() != "true":
                    with api.changed:
                        items = [
                            copy.deepcopy(j)
                            for j in api.jobs.values()
                            if _matches(j["metadata"].get("labels") or {}, query.get("labelSelector"))
                        ]
                        version = api.version
                    self._send(
                        200,
                        {
                            "apiVersion": "batch/v1",
                            "kind": "JobList",
                            "metadata": {"resourceVersion": str(version)},
                            "items": items,
                        },
                    )
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for line in api.watch(
                    int(query.get("resourceVersion", "0")), float(query.get("timeoutSeconds", "5"))
                ):
                    self.wfile.write(json.dumps(line).encode() + b"\n")
                    self.wfile.flush()

            def do_PATCH(self) -> None:  # noqa: N802 - a Deployment's scale subresource (served models)
                api.requests.append(f"PATCH {self.path}")
                path = urlparse(self.path).path
                prefix = f"/apis/apps/v1/namespaces/{ns}/deployments/"
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not (path.startswith(prefix) and path.endswith("/scale")):
                    self.send_error(404)
                    return
                name = path[len(prefix) : -len("/scale")]
                replicas = int(body["spec"]["replicas"])
                api.scales.append((name, replicas))
                self._send(
                    200,
                    {
                        "apiVersion": "autoscaling/v1",
                        "kind": "Scale",
                        "metadata": {"name": name, "namespace": ns},
                        "spec": {"replicas": replicas},
                        "status": {"replicas": replicas},
                    },
                )

            def do_POST(self) -> None:  # noqa: N802
                api.requests.append(f"POST {self.path}")
                job = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                meta = job.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    # as the API server does: the prefix and five random characters
                    meta["name"] = meta.pop("generateName") + uuid.uuid4().hex[:5]
                name = meta.get("name")
                with api.changed:
                    if name in api.jobs:
                        self._send(409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists'))
                        return
                    job["metadata"].update(namespace=api.ns, uid=str(uuid.uuid4()), creationTimestamp=_now())
                    job["status"] = {}
                    api.jobs[name] = job
                    api._bump(name)
                    body = copy.deepcopy(job)
                self._send(201, body)
                if api.controller and job["spec"]["template"]["spec"]["containers"][0]["name"] == "step":
                    thread = threading.Thread(
                        target=api._run_job, args=(name, job["metadata"]["uid"]), daemon=True
                    )
                    api.runners.append(thread)
                    thread.start()

            def do_DELETE(self) -> None:  # noqa: N802
                api.requests.append(f"DELETE {self.path}")
                name = self._name()
                with api.changed:
                    job = api.jobs.pop(name or "", None)
                    if job is not None:
                        api._bump(name or "")
                if job is None:
                    self._send(404, _status(404, "NotFound", f'jobs.batch "{name}" not found'))
                else:
                    self._send(
                        200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
                    )

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.bound(server, max_requests, seconds)

    def watch(self, since: int, timeout: float) -> list[dict[str, Any]]:
        """The events a watch from `since` gets before it ends (the server ends it after the first batch)."""
        end = time.monotonic() + min(timeout, 30.0)
        with self.changed:
            while True:
                if since < self.oldest:
                    return [
                        {
                            "type": "ERROR",
                            "object": {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "metadata": {},
                                "status": "Failure",
                                "message": f"too old resource version: {since} ({self.oldest})",
                                "reason": "Expired",
                                "code": 410,
                            },
                        }
                    ]
                fresh = [(v, n) for v, n in self.events if v > since]
                if fresh:
                    return [{"type": "MODIFIED", "object": _job(n, self.ns, v)} for v, n in fresh]
                left = end - time.monotonic()
                if left <= 0:
                    return []  # the watch's timeout: it ends with no event
                self.changed.wait(left)

    def _bump(self, name: str) -> None:
        """A change of the Job `name` (the caller holds `changed`): a new resourceVersion, watchers woken."""
        self.version += 1
        self.events.append((self.version, name))
        if name in self.jobs:
            self.jobs[name]["metadata"]["resourceVersion"] = str(self.version)
        self.changed.notify_all()

    def _run_job(self, name: str, uid: str) -> None:
        """The Job controller and kubelet for one Job: its pods, their retries, its final condition."""
        with self.changed:
            job = copy.deepcopy(self.jobs[name])
        spec = job["spec"]
        container = spec["template"]["spec"]["containers"][0]
        final_codes: set[int] = set()
        for rule in (spec.get("podFailurePolicy") or {}).get("rules", []):
            if rule.get("action") in ("FailJob", "FailIndex") and "onExitCodes" in rule:
                final_codes |= set(rule["onExitCodes"]["values"])
        indexed = spec.get("completionMode") == "Indexed"
        limit = spec.get("backoffLimitPerIndex", 0) if indexed else spec.get("backoffLimit", 6)
        failed: tuple[int | None, int] | None = None
        succeeded = failed_pods = 0
        for index in range(spec.get("completions", 1)) if indexed else [None]:
            for _ in range(limit + 1):
                with self.changed:
                    gone = name not in self.jobs or self.jobs[name]["metadata"]["uid"] != uid
                    planned = self.exits.get(name)
                    code = planned.pop(0) if planned else None
                if gone:
                    return  # deleted: its pods are garbage collected
                if code is None and self.pod_runner is not None:
                    extra = {"JOB_COMPLETION_INDEX": str(index)} if indexed else {}
                    code, _ = self.pod_runner.run(spec["template"]["spec"], extra_env=extra, timeout=600)
                elif code is None:
                    env = {**os.environ, **({"JOB_COMPLETION_INDEX": str(index)} if indexed else {})}
                    code = subprocess.run(
                        [python_for_image(container["image"]), "-m", "hala.ops.launch", *container["args"]],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=600,
                    ).returncode
                self.pods.append((name, index, code))
                if code == 0:
                    succeeded += 1
                    break
                failed_pods += 1
                if code in final_codes:
                    break
            if code != 0:
                failed = (index, code)
                break
        with self.changed:
            if name not in self.jobs or self.jobs[name]["metadata"]["uid"] != uid:
                return
            # the status a Job controller of Kubernetes >= 1.31 leaves: counts, indexes, and the interim
            # condition (SuccessCriteriaMet, FailureTarget) before the final one
            status: dict[str, Any] = {"succeeded": succeeded, "failed": failed_pods}
            now = _now()
            if failed is None:
                status["conditions"] = [
                    {"type": t, "status": "True", "lastTransitionTime": now}
                    for t in ("SuccessCriteriaMet", "Complete")
                ]
                if indexed:
                    status["completedIndexes"] = _ranges(range(succeeded))
            else:
                index, code = failed
                why = "PodFailurePolicy" if code in final_codes else "BackoffLimitExceeded"
                message = f"Container {container['name']} for pod {name}-{index} failed with exit code {code}"
                status["conditions"] = [
                    {
                        "type": t,
                        "status": "True",
                        "reason": why,
                        "lastTransitionTime": now,
                        "message": message,
                    }
                    for t in ("FailureTarget", "Failed")
                ]
                if indexed:
                    status["completedIndexes"] = _ranges(range(index or 0)) if index else ""
                    status["failedIndexes"] = str(index)
            self.jobs[name]["status"] = status
            self._bump(name)

    def settle(self, timeout: float = 600) -> None:
        """Wait for the pods of every Job created so far to end (a test's last look, before the server
        stops)."""
        for thread in list(self.runners):
            thread.join(timeout=timeout)

    def change(self, name: str) -> None:
        with self.changed:
            self.version += 1
            self.events.append((self.version, name))
            self.changed.notify_all()

    def forget(self) -> None:
        """Compact the history: every version a client holds now is too old."""
        with self.changed:
            self.version += 1
            self.oldest = self.version
            self.events.clear()
            self.changed.notify_all()

    def kubeconfig(self) -> str:
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": self.url}}],
                "contexts": [
                    {"name": "test", "context": {"cluster": "test", "user": "test", "namespace": self.ns}}
                ],
                "users": [{"name": "test", "user": {}}],
            }
        )

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()
