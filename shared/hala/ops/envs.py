"""Dependency sets and their environments: `.venvs/<set>/`, the same sets the images install.

Sets conflict (vLLM pins its own torch and compressed-tensors; llm-compressor pins others), so every
set gets its own virtual environment:

    cli      the common library and the contract tests (tests/contract)
    models   the library's model helpers (hala.contract.tiny) and their tests (tests/models)
    <env>    for every `env = "<env>"` named in a stages/<name>/stage.toml: the union of those stages'
             requirements.txt, tests in tests/stages/<name>

`hala setup` makes each one with uv, exactly as locked (locks/<variant>/<set>.txt, plus <set>.tests.txt
for the tests; see hala.ops.locks): `uv pip sync --require-hashes`, packages hardlinked from uv's one cache,
so torch lies on disk once however many environments hold it. The package sources are those of pip's own
configuration (hala.ops.pipconf). A stamp of the locks, uv's version and the Python version makes a second
call a no-op. `hala test` runs each suite in its own set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hala.contract import stagespec

REPO = Path(__file__).resolve().parents[3]  # shared/hala/ops/envs.py -> the repository
STAMP = ".hala-stamp"


@dataclass
class EnvSet:
    name: str
    requirements: list[Path] = field(default_factory=list)
    tests: list[Path] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    # modules its warm interpreter imports ahead (hala.kit.warm)
    warm: list[str] = field(default_factory=list)


def venvs_dir() -> Path:
    return Path(os.environ.get("HALA_VENVS", REPO / ".venvs"))


def env_sets() -> dict[str, EnvSet]:
    lib = REPO / "shared" / "requirements.txt"
    test_reqs = REPO / "tests" / "requirements.txt"
    sets = {
        "cli": EnvSet(
            "cli",
            [
                lib,
                REPO / "shared" / "requirements-report.txt",
                REPO / "shared" / "requirements-cluster.txt",
                test_reqs,
                REPO / "tests" / "requirements-contract.txt",
            ],
            [REPO / "tests" / "contract"],
        ),
        "models": EnvSet(
            "models",
            [lib, REPO / "shared" / "requirements-models.txt", test_reqs],
            [REPO / "tests" / "models"],
        ),
    }
    for spec in stagespec.all_stages().values():
        if spec.root.resolve().parent != REPO / "stages":
            continue  # stages from HALA_STAGES_PATH (test fixtures) bring no dependency set
        env = sets.setdefault(spec.env, EnvSet(spec.env, [lib, test_reqs]))
        reqs = spec.requirements_path.resolve()
        if reqs.exists() and reqs not in env.requirements:
            env.requirements.append(reqs)
        tests = REPO / "tests" / "stages" / spec.name
        if tests.exists():
            env.tests.append(tests)
            # test-only dependencies (e.g. MergeKit, to compare with): in the environment, never in the image
            if (tests / "requirements.txt").exists():
                env.requirements.append(tests / "requirements.txt")
        env.remove.extend(r for r in spec.env_remove if r not in env.remove)
        env.warm.extend(m for m in spec.warm if m not in env.warm)
        env.stages.append(spec.name)
    return sets


def python_for(env: str) -> Path:
    return venvs_dir() / env / "bin" / "python"


def variant() -> str:
    """cpu by default; HALA_VARIANT=cuda makes the environments of a GPU machine from the cuda locks."""
    value = os.environ.get("HALA_VARIANT", "cpu")
    if value not in ("cpu", "cuda"):
        raise SystemExit(f"HALA_VARIANT={value!r}: use cpu or cuda")
    return value


def lock_files(env: EnvSet) -> list[Path]:
    folder = REPO / "locks" / variant()
    return [folder / f"{env.name}.txt", folder / f"{env.name}.tests.txt"]


def _stamp(env: EnvSet) -> str:
    from hala.ops import locks

    h = hashlib.sha256(sys.version.encode())
    h.update(locks.uv_version().encode())
    for path in [*lock_files(env), REPO / "pyproject.toml"]:
        h.update(path.read_bytes() if path.exists() else b"missing")
    return h.hexdigest()


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    print(f"[setup] {what}", flush=True)
    subprocess.run(cmd, check=True, env=env)


def setup_env(env: EnvSet, force: bool = False) -> bool:
    """Create or update one environment from its locks; returns True when it had to install anything."""
    from hala.ops import locks, pipconf

    root = venvs_dir() / env.name
    stamp = _stamp(env)
    if not force and (root / STAMP).exists() and (root / STAMP).read_text() == stamp:
        return False
    missing = [p for p in lock_files(env) if not p.exists()]
    if missing:
        raise SystemExit(
            f"[setup] {env.name}: no lock {', '.join(str(p.relative_to(REPO)) for p in missing)}: run `make "
            "lock`"
        )
    t0 = time.monotonic()
    uv = locks.uv_binary()
    py = str(root / "bin" / "python")
    run_env = {**os.environ, **pipconf.uv_env()}
    sources = pipconf.uv_args()
    if any(
        "+cpu" in line for line in lock_files(env)[0].read_text().splitlines() if line.startswith("torch==")
    ) and not pipconf.local_wheel("torch-*+cpu-*.whl"):
        # no local CPU build: PyTorch's own page of wheels
        sources += ["--find-links", pipconf.TORCH_CPU_LINKS]
    # the interpreter the environments are made from: the one running this (its base, when it is a venv)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([uv, "venv", "-q", "--allow-existing", "--python", base, str(root)], f"{env.name}: venv", run_env)
    _run(
        [
            uv,
            "pip",
            "sync",
            "-q",
            "--python",
            py,
            "--require-hashes",
            "--link-mode",
            "hardlink",
            *sources,
            *[str(p) for p in lock_files(env)],
        ],
        f"{env.name}: {' + '.join(p.name for p in lock_files(env))}",
        run_env,
    )
    _run(
        [
            uv,
            "pip",
            "install",
            "-q",
            "--python",
            py,
            "--no-deps",
            "--link-mode",
            "hardlink",
            *sources,
            "-e",
            str(REPO),
        ],
        f"{env.name}: hala (editable)",
        run_env,
    )
    (root / STAMP).write_text(stamp)
    print(f"[setup] {env.name}: ready in {time.monotonic() - t0:.1f} s ({root})", flush=True)
    return True


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


# cli: +~6 min on 2026-12-07 for the recovery and crash-point tests (issue 32), so it starts first
FRESH_SECONDS = {
    "cli": 700,
    "serve": 392,
    "eval": 203,
    "merge": 127,
    "models": 89,
    "train": 83,
    "compress": 30,
    "publish": 23,
    "data": 5,
}


def _timings_file() -> Path:
    return venvs_dir() / ".test-seconds.json"


def test(
    names: list[str] | None = None, pytest_args: list[str] | None = None, jobs: int | None = None
) -> int:
    """Run each environment's test suites with that environment's Python, `jobs` suites at a time (default
    HALA_TEST_JOBS, else one per core up to 2), the longest first; each suite's output is printed whole when
    it ends, then a summary. Every suite shares one folder of tiny stand-ins (HALA_TINY_CACHE): each trains
    once."""
    import json
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from hala.contract.store import cache_root

    sets = env_sets()
    unknown = [n for n in names or [] if n not in sets]
    if unknown:
        print(f"unknown environment(s) {unknown}; known: {', '.join(sets)}", file=sys.stderr)
        return 2
    jobs = jobs or int(os.environ.get("HALA_TEST_JOBS", 0)) or min(2, os.cpu_count() or 1)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HALA_TINY_CACHE", str(cache_root() / "tiny"))
    try:
        last = json.loads(_timings_file().read_text())
    except (OSError, ValueError):
        last = {}
    # longest first; a fresh clone (no timings of its own yet) orders by the suites' seconds in a fresh CI run
    # of 2026-12-02, 2 cores: in declaration order the two longest ended up in one lane (684 s instead of ~660
    # s)
    last = {**FRESH_SECONDS, **last}
    todo = [(n, [str(p) for p in sets[n].tests if p.exists()]) for n in (names or list(sets))]
    todo = sorted([(n, d) for n, d in todo if d], key=lambda item: -last.get(item[0], 0))
    jobs = max(1, min(jobs, len(todo)))
    # Suites side by side share the cores: torch's OpenMP pool in each suite sized for all of them
    # oversubscribes the machine. One core's share each: merge + train side by side on 2 cores took 111 s
    # instead of 141 s (train 73 s instead of 120 s), 2026-12-02. vLLM's CPU build binds its own threads
    # (VLLM_CPU_OMP_THREADS_BIND).
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))

    lock = threading.Lock()

    def one(item: tuple[str, list[str]]) -> tuple[str, int, float]:
        name, dirs = item
        t0 = time.monotonic()
        with tempfile.TemporaryFile("w+") as out:
            # the ten slowest tests of each suite in its output: where CI's minutes go, read from any CI log
            code = subprocess.run(
                [str(python_for(name)), "-m", "pytest", *dirs, "--durations=10", *(pytest_args or [])],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
            secs = time.monotonic() - t0
            out.seek(0)
            with lock:
                print(
                    f"\n=== tests in environment '{name}' ({secs:.0f} s): "
                    f"{' '.join(os.path.relpath(d, REPO) for d in dirs)}",
                    flush=True,
                )
                sys.stdout.write(out.read())
                sys.stdout.flush()
        return name, code, secs

    t_all = time.monotonic()
    print(f"[test] {len(todo)} suites, {jobs} at a time: {', '.join(n for n, _ in todo)}", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, todo))
    try:
        _timings_file().write_text(json.dumps({**last, **{n: round(s, 1) for n, _, s in results}}, indent=1))
    except OSError:
        pass
    print(f"\n=== summary ({time.monotonic() - t_all:.0f} s, {jobs} suites at a time)")
    for name, code, secs in results:
        print(f"  {name:10s} {'passed' if code == 0 else f'FAILED (exit {code})':18s} {secs:6.0f} s")
    return 0 if results and all(code == 0 for _, code, _ in results) else 1
