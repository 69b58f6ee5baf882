"""A pod's container run on this machine, as the kubelet would run it, for the stand-ins of the tests (the
Jobs API's controller, the Argo Workflow runner): the container's command and args, its environment as
rendered, its volumes, its Secrets.

    pods = Venvs(env)                          # each image's set in the environment that holds its lock
    pods = Docker(docker, secrets=..., config_maps=...)   # `docker run` of the image itself (host network)
    code, output = pods.run(pod_spec, extra_env={"JOB_COMPLETION_INDEX": "1"}, timeout=600)
    handle = pods.start(pod_spec)             # a Deployment's pod (a served model), until pods.stop(handle)

What stands in for the cluster, in both: a Service's DNS name in an environment value
(`http://NAME.NS.svc:PORT/...`) reaches the pod behind it on 127.0.0.1 at its container port (`services`:
the rendered Services, with the Deployments whose ports they name). In Docker, emptyDir volumes are tmpfs,
a ConfigMap is its files mounted read-only (subPath: the one file), the pod's runAsUser and the container's
readOnlyRootFilesystem are kept, and a Secret's values come from `secrets` (the caller's stand-in for the
cluster's Secrets; an optional one that is missing is left out, as the kubelet does).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hala.contract import stagespec

REPO = Path(__file__).resolve().parents[2]
SKIPPED_ENV = {"HOME", "HF_HOME"}  # a pod's are emptyDirs; in Venvs the machine's, which hold the caches


def python_for_image(image: str) -> str:
    """The interpreter that stands in for an image here: `local/hala-<set>:tag` runs in `.venvs/<set>`, the
    environment that holds the same lock (hala.ops.images), else this process's own."""
    name = image.rsplit("/", 1)[-1].split(":")[0]
    python = REPO / ".venvs" / name.removeprefix("hala-") / "bin" / "python"
    return str(python) if name.startswith("hala-") and python.exists() else sys.executable


def service_ports(objects: list[dict[str, Any]]) -> dict[str, int]:
    """`NAME.NS.svc:PORT` -> the container port behind it, from rendered Services and Deployments."""
    ports: dict[str, dict[str, int]] = {}  # deployment selector labels -> named ports
    for obj in objects:
        if obj.get("kind") == "Deployment":
            labels = tuple(sorted(obj["spec"]["selector"]["matchLabels"].items()))
            container = obj["spec"]["template"]["spec"]["containers"][0]
            ports[str(labels)] = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    out: dict[str, int] = {}
    for obj in objects:
        if obj.get("kind") != "Service":
            continue
        named = ports.get(str(tuple(sorted(obj["spec"]["selector"].items()))), {})
        host = f"{obj['metadata']['name']}.{obj['metadata']['namespace']}.svc"
        for port in obj["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            out[f"{host}:{port['port']}"] = named[target] if isinstance(target, str) else target
    return out


def _cluster_dns(value: str, services: dict[str, int]) -> str:
    def local(m: re.Match) -> str:
        port = services.get(m.group(2))
        return f"{m.group(1)}127.0.0.1:{port}" if port else m.group(0)

    return re.sub(r"(https?://)([\w.-]+\.svc(?:\.cluster\.local)?:\d+)", local, value)


class _Pods:
    def __init__(self, secrets: dict[str, dict[str, str]] | None, services: dict[str, int] | None):
        self.secrets = secrets or {}
        self.services = services or {}

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's variables as the kubelet sets them: envFrom's Secrets first, then env in order."""
        out: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source.get("secretRef")
            if ref and ref["name"] in self.secrets:
                out.update(self.secrets[ref["name"]])
        for item in container.get("env", []):
            if "value" in item:
                out[item["name"]] = _cluster_dns(str(item["value"]), self.services)
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                if ref["key"] in self.secrets.get(ref["name"], {}):
                    out[item["name"]] = self.secrets[ref["name"]][ref["key"]]
        return out


def _command(container: dict[str, Any]) -> tuple[list[str], bool]:
    """The container's command line, and whether it is a step (run by the image's ENTRYPOINT, hala-stage).
    A pod's 0.0.0.0 is every interface of the pod's own network; here, on the host's network, it would be
    every interface of the machine: the stand-in listens on 127.0.0.1 instead."""
    if container.get("command"):
        cmd = [*container["command"], *container.get("args", [])]
        return ["127.0.0.1" if part == "0.0.0.0" else part for part in cmd], False  # noqa: S104
    args = container["args"]
    return args, args[0] in stagespec.all_stages()


class Venvs(_Pods):
    """Each container as a process of the environment that holds its image's lock: `hala-stage ARGS` as
    `python -m hala.ops.launch ARGS`, `hala ARGS` (hala-cli) as `python -m hala.ops.cli ARGS`, a command
    (`python -m ...`) with that environment's Python. `env` is the base (this machine's caches)."""

    def __init__(self, env: dict[str, str], secrets=None, services=None):
        super().__init__(secrets, services)
        self.env = env

    def _argv(self, container: dict[str, Any]) -> list[str]:
        python = python_for_image(container["image"])
        cmd, step = _command(container)
        if container.get("command"):
            return [python if cmd[0] == "python" else cmd[0], *cmd[1:]]
        return [python, "-m", "hala.ops.launch" if step else "hala.ops.cli", *cmd]

    def _env(self, container: dict[str, Any], extra: dict[str, str] | None) -> dict[str, str]:
        values = {k: v for k, v in self.environment(container).items() if k not in SKIPPED_ENV}
        return {**self.env, **values, **(extra or {})}

    def run(self, pod: dict[str, Any], extra_env=None, timeout: float = 600) -> tuple[int, str]:
        container = pod["containers"][0]
        done = subprocess.run(
            self._argv(container),
            env=self._env(container, extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.returncode, (done.stderr + done.stdout)[-3000:]

    def start(self, pod: dict[str, Any]) -> Any:
        container = pod["containers"][0]
        log = tempfile.NamedTemporaryFile(prefix="pod-", suffix=".log", delete=False)  # noqa: SIM115
        proc = subprocess.Popen(
            self._argv(container),
            env=self._env(container, None),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return proc, Path(log.name)

    def alive(self, handle: Any) -> bool:
        return handle[0].poll() is None

    def stop(self, handle: Any) -> str:
        from hala.ops.served import stop

        stop(handle[0])
        return handle[1].read_text(errors="replace")[-3000:]


class Docker(_Pods):
    """Each container as `docker run` of its image, on the host's network (the only network here)."""

    def __init__(
        self,
        docker: str = "docker",
        secrets=None,
        services=None,
        config_maps: dict[str, dict[str, str]] | None = None,
    ):
        super().__init__(secrets, services)
        self.docker = docker
        self.config_maps = config_maps or {}
        self.files = Path(tempfile.mkdtemp(prefix="podrun-config-"))

    def _argv(self, pod: dict[str, Any], extra: dict[str, str] | None, detach: bool) -> list[str]:
        container = pod["containers"][0]
        argv = [self.docker, "run", "--network", "host", "--init"]
        argv += ["-d"] if detach else ["--rm"]
        user = pod.get("securityContext", {})
        if "runAsUser" in user:
            argv += ["--user", f"{user['runAsUser']}:{user.get('runAsGroup', user['runAsUser'])}"]
        if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                uid = user.get("runAsUser", 0)
                argv += ["--tmpfs", f"{mount['mountPath']}:exec,uid={uid},gid={user.get('fsGroup', uid)}"]
            elif "configMap" in volume:
                argv += [
                    "-v",
                    f"{self._config_file(volume['configMap']['name'], mount)}:{mount['mountPath']}:ro",
                ]
            else:
                raise ValueError(f"volume {mount['name']}: only emptyDir and configMap are stood in for")
        if "memory" in pod.get("containers", [{}])[0].get("resources", {}).get("limits", {}):
            argv += ["--shm-size", "1g"]  # an emptyDir at /dev/shm on a cluster; Docker's default is 64 MiB
        for key, value in {**self.environment(container), **(extra or {})}.items():
            argv += ["-e", f"{key}={value}"]
        cmd, _ = _command(container)
        if container.get("command"):
            argv += ["--entrypoint", cmd[0], container["image"], *cmd[1:]]
        else:
            argv += [container["image"], *cmd]
        return argv

    def _config_file(self, name: str, mount: dict[str, Any]) -> Path:
        data = self.config_maps[name]
        folder = self.files / name
        folder.mkdir(exist_ok=True)
        for key, text in data.items():
            (folder / key).write_text(text)
            (folder / key).chmod(0o644)
        folder.chmod(0o755)
        return folder / mount["subPath"] if mount.get("subPath") else folder

    def run(self, pod: dict[str, Any], extra_env=None, timeout: float = 600) -> tuple[int, str]:
        done = subprocess.run(
            self._argv(pod, extra_env, detach=False), capture_output=True, text=True, timeout=timeout
        )
        return done.returncode, (done.stderr + done.stdout)[-3000:]

    def start(self, pod: dict[str, Any]) -> Any:
        done = subprocess.run(self._argv(pod, None, detach=True), capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def alive(self, handle: Any) -> bool:
        state = subprocess.run(
            [self.docker, "inspect", "-f", "{{.State.Running}}", handle], capture_output=True, text=True
        )
        return state.stdout.strip() == "true"

    def stop(self, handle: Any) -> str:
        subprocess.run([self.docker, "stop", "-t", "30", handle], capture_output=True, check=False)
        logs = subprocess.run([self.docker, "logs", handle], capture_output=True, text=True, check=False)
        subprocess.run([self.docker, "rm", "-f", handle], capture_output=True, check=False)
        return (logs.stderr + logs.stdout)[-3000:]


def wait_probe(pods: Any, handle: Any, pod: dict[str, Any], timeout: float) -> float:
    """Seconds until the container's startup (else readiness) probe, a GET of .../models, answers 200 on
    127.0.0.1, as the kubelet marks the pod ready (hala.ops.served.wait_ready, the local runner's own wait);
    RuntimeError with the pod's log if the container ends first or the time runs out."""
    from hala.contract.errors import TemporaryError
    from hala.ops.served import wait_ready

    container = pod["containers"][0]
    probe = container.get("startupProbe") or container["readinessProbe"]
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    path = probe["httpGet"]["path"]
    assert path.endswith("/models"), f"a served model's probe is its /models, not {path}"

    class Running:  # poll() as a process has it: None while the container runs
        def poll(self) -> int | None:
            return None if pods.alive(handle) else 1

    try:
        return wait_ready(f"http://127.0.0.1:{port}{path.removesuffix('/models')}", Running(), timeout)
    except TemporaryError as e:
        raise RuntimeError(f"{e}:\n{pods.stop(handle)}") from None
