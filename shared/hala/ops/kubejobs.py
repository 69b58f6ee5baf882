"""The Jobs of one namespace, as the conductor and `hala cancel` see them: create, get, delete, list by label
selector, and wait on the watch API for the next change (from the last resourceVersion seen, so no change
between two watches is missed; after a dropped watch or a 410 Gone the next call lists again). KubeJobs goes
through the official kubernetes client; the tests put a stand-in of the API server behind it
(tests/_lib/kubeapi.py), and FakeCluster-style objects of the same shape (the `Jobs` protocol) in front of the
conductor.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any, Protocol

from hala.contract import logs


class Conflict(Exception):
    """The API refused to create a Job because one with that name exists (HTTP 409)."""


class Jobs(Protocol):
    """The calls the conductor and `hala cancel` make; KubeJobs is the real one."""

    def create(self, job: dict[str, Any]) -> None: ...
    def get(self, name: str) -> dict[str, Any] | None: ...
    def delete(self, name: str) -> None: ...
    def list(self, selector: str) -> list[dict[str, Any]]: ...
    def wait(self, seconds: float) -> None: ...


class KubeJobs:
    """Jobs of one namespace through the official client (in-cluster config, else ~/.kube/config,
    KUBECONFIG)."""

    def __init__(self, ns: str | None, selector: str | None = None):
        from kubernetes import client, config

        self.selector = selector
        self.version: str | None = None  # the resourceVersion the next watch starts from
        try:
            config.load_incluster_config()
            default_ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read().strip()
        except config.ConfigException:
            # the client reads $KUBECONFIG once, when it is imported: a later value (a test's, a wrapper's) is
            # passed on
            where = os.environ.get("KUBECONFIG") or None
            config.load_kube_config(config_file=where)
            default_ns = (config.list_kube_config_contexts(config_file=where)[1] or {}).get(
                "context", {}
            ).get("namespace") or "default"
        self.ns, self.api, self.client = ns or default_ns, client.BatchV1Api(), client
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
            # Background: the Job object goes now (its name is free for the next attempt), its pods after it
            self.api.delete_namespaced_job(name, self.ns, propagation_policy="Background")
        except self.exc as e:
            if e.status != 404:
                raise

    def scale(self, deployment: str, replicas: int) -> None:
        """A served model's Deployment to `replicas` (its scale subresource: the conductor's Role allows only
        that)."""
        self.client.AppsV1Api().patch_namespaced_deployment_scale(
            deployment, self.ns, {"spec": {"replicas": replicas}}
        )

    def list(self, selector: str) -> list[dict[str, Any]]:
        listing = self.api.list_namespaced_job(self.ns, label_selector=selector)
        return [self.client.ApiClient().sanitize_for_serialization(j) for j in listing.items]

    def wait(self, seconds: float) -> None:
        """Until a Job of the run changes, or `seconds` pass: the watch API, from the last resourceVersion
        seen, so no change between two waits is missed. The conductor reads every Job it follows after each
        wait, which is the resync: a watch the server ends or drops returns at once (after a short pause, so a
        flapping API server is not hammered), and a 410 Gone (a version older than the server keeps) starts
        again from a fresh list."""
        from kubernetes import watch

        if self.version is None:
            listing = self.api.list_namespaced_job(self.ns, label_selector=self.selector)
            self.version = listing.metadata.resource_version
        w = watch.Watch()
        started = time.monotonic()
        try:
            for event in w.stream(
                self.api.list_namespaced_job,
                self.ns,
                label_selector=self.selector,
                resource_version=self.version,
                timeout_seconds=max(1, int(seconds)),
                allow_watch_bookmarks=True,
            ):
                self.version = event["object"].metadata.resource_version or self.version
                if event["type"] != "BOOKMARK":
                    return  # a Job was added, changed or deleted: the conductor looks
        except self.exc as e:
            if e.status != 410:
                raise
            self.version = None  # expired: list again next time
        # a dropped connection (urllib3's errors): the next pass resyncs
        except Exception as e:  # noqa: BLE001
            logs.get("hala.k8s").info("watch dropped", error=f"{type(e).__name__}: {e}"[:300])
            time.sleep(max(0.0, min(5.0, seconds - (time.monotonic() - started))))
        finally:
            w.stop()


def job_outcome(job: dict[str, Any]) -> tuple[str, str, float | None]:
    """('complete' | 'failed' | 'running', reason, when it failed as a Unix time) from the Job's
    conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "complete", "", None
        if cond.get("type") == "Failed":
            when = cond.get("lastTransitionTime")
            at = datetime.fromisoformat(str(when).replace("Z", "+00:00")).timestamp() if when else None
            return "failed", f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": "), at
    return "running", "", None
