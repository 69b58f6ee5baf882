"""Dependency sets and their environments: `.venvs/<set>/`, the same sets the images install.

Sets conflict (vLLM pins its own torch and compressed-tensors; llm-compressor pins others), so every
set gets its own virtual environment:

    cli      the common library and the contract tests (tests/contract)
    models   the library's model helpers (hala.tiny) and their tests (tests/models)
    <env>    for every `env = "<env>"` named in a stages/<name>/stage.toml: the union of those stages'
             requirements.txt, tests in tests/stages/<name>

`hala setup` creates or updates them; a stamp of every input (requirement files, constraints,
pyproject, Python version) makes a second call a no-op. `hala test` runs each suite in its own set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hala import stagespec

REPO = Path(__file__).resolve().parent.parent
STAMP = ".hala-stamp"


@dataclass
class EnvSet:
    name: str
    requirements: list[Path] = field(default_factory=list)
    tests: list[Path] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)


def venvs_dir() -> Path:
    return Path(os.environ.get("HALA_VENVS", REPO / ".venvs"))


def env_sets() -> dict[str, EnvSet]:
    lib = REPO / "shared" / "requirements.txt"
    test_reqs = REPO / "tests" / "requirements.txt"
    sets = {
        "cli": EnvSet("cli", [lib, REPO / "shared" / "requirements-report.txt", REPO / "shared" / "requirements-cluster.txt",
                              test_reqs, REPO / "tests" / "requirements-contract.txt"], [REPO / "tests" / "contract"]),
        "models": EnvSet("models", [lib, REPO / "shared" / "requirements-models.txt", test_reqs], [REPO / "tests" / "models"]),
    }
    for spec in stagespec.all_stages().values():
        if spec.root.parent != REPO / "stages":
            continue  # stages from HALA_STAGES_PATH (test fixtures) bring no dependency set
        env = sets.setdefault(spec.env, EnvSet(spec.env, [lib, test_reqs]))
        if spec.requirements_path.exists() and spec.requirements_path not in env.requirements:
            env.requirements.append(spec.requirements_path)
        tests = REPO / "tests" / "stages" / spec.name
        if tests.exists():
            env.tests.append(tests)
            # test-only dependencies (e.g. MergeKit, to compare with): in the environment, never in the image
            if (tests / "requirements.txt").exists():
                env.requirements.append(tests / "requirements.txt")
        env.remove.extend(r for r in spec.env_remove if r not in env.remove)
        env.stages.append(spec.name)
    return sets


def python_for(env: str) -> Path:
    return venvs_dir() / env / "bin" / "python"


def _stamp(env: EnvSet) -> str:
    h = hashlib.sha256(sys.version.encode())
    for path in [*env.requirements, REPO / "shared" / "constraints.txt", REPO / "pyproject.toml"]:
        h.update(path.read_bytes())
    h.update(" ".join(env.remove).encode())
    return h.hexdigest()


def _run(cmd: list[str], what: str) -> None:
    print(f"[setup] {what}: {' '.join(cmd[-6:])}", flush=True)
    subprocess.run(cmd, check=True)


def setup_env(env: EnvSet, force: bool = False) -> bool:
    """Create or update one environment; returns True when it had to install anything."""
    root = venvs_dir() / env.name
    stamp = _stamp(env)
    if not force and (root / STAMP).exists() and (root / STAMP).read_text() == stamp:
        return False
    t0 = time.monotonic()
    if not (root / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(root)], f"create {env.name}")
    py = str(root / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-qq"]
    constraints = ["-c", str(REPO / "shared" / "constraints.txt")]
    reqs = [arg for r in env.requirements for arg in ("-r", str(r))]
    # torch first, alone: pip then keeps the local CPU build instead of resolving a CUDA one for vLLM.
    if any("torch==" in r.read_text() for r in env.requirements):
        _run([*pip, "install", *constraints, "torch==2.13.0"], f"{env.name}: torch")
    _run([*pip, "install", *constraints, *reqs], f"{env.name}: requirements")
    _run([*pip, "install", "--no-deps", "-e", str(REPO)], f"{env.name}: hala (editable)")
    present = [r for r in env.remove if _installed(py, r)]
    if present:
        _run([*pip, "uninstall", "-y", *present], f"{env.name}: remove {', '.join(present)}")
    (root / STAMP).write_text(stamp)
    print(f"[setup] {env.name}: ready in {time.monotonic() - t0:.0f} s ({root})", flush=True)
    return True


def _installed(py: str, dist: str) -> bool:
    probe = "import importlib.metadata as m, sys\ntry: m.version(sys.argv[1])\nexcept m.PackageNotFoundError: sys.exit(1)"
    return subprocess.run([py, "-c", probe, dist], capture_output=True).returncode == 0


def setup(names: list[str] | None = None, force: bool = False) -> int:
    sets = env_sets()
    unknown = [n for n in names or [] if n not in sets]
    if unknown:
        print(f"unknown environment(s) {unknown}; known: {', '.join(sets)}", file=sys.stderr)
        return 2
    changed = [n for n in (names or list(sets)) if setup_env(sets[n], force=force)]
    if not changed:
        print(f"[setup] all environments up to date: {', '.join(names or sets)}", flush=True)
    return 0


def test(names: list[str] | None = None, pytest_args: list[str] | None = None) -> int:
    """Run each environment's test suites with that environment's Python; all of them, then a summary."""
    sets = env_sets()
    results: list[tuple[str, int, float]] = []
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in names or list(sets):
        es = sets[name]
        dirs = [str(p) for p in es.tests if p.exists()]
        if not dirs:
            continue
        t0 = time.monotonic()
        print(f"\n=== tests in environment '{name}': {' '.join(os.path.relpath(d, REPO) for d in dirs)}", flush=True)
        code = subprocess.run([str(python_for(name)), "-m", "pytest", *dirs, *(pytest_args or [])], cwd=REPO, env=env).returncode
        results.append((name, code, time.monotonic() - t0))
    print("\n=== summary")
    for name, code, secs in results:
        print(f"  {name:10s} {'passed' if code == 0 else f'FAILED (exit {code})':18s} {secs:6.0f} s")
    return 0 if results and all(code == 0 for _, code, _ in results) else 1
