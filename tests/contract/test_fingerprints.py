"""A step's fingerprint covers all the code that shapes its output: the stage's files, every library module
the stage imports (directly or through other library modules), and the versions of the result-shaping
libraries its lock pins. A change to any of them plans the step again; a library module it never imports
leaves it cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hala.contract import stagespec
from helpers import REPO, hala, write_recipe

LAMINI = REPO / "recipes" / "samples" / "lamini.jsonl"


def _checkout_with_a_library_copy(tmp_path: Path) -> Path:
    """A checkout whose library (`hala`) is a copy that the test may edit; the rest links to this repository.
    PYTHONPATH puts the copy ahead of the editable install, in the runner and in every step it starts."""
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "shared").mkdir()
    shutil.copytree(
        REPO / "shared" / "hala", root / "shared" / "hala", ignore=shutil.ignore_patterns("__pycache__")
    )
    for item in (REPO / "shared").iterdir():
        if item.name != "hala":
            (root / "shared" / item.name).symlink_to(item)
    for name in ("stages", "locks", "recipes", "tests", "pyproject.toml", ".venvs"):
        (root / name).symlink_to(REPO / name)
    return root


def _pythonpath(root: Path) -> str:
    """The library copy first (shared/ holds the package `hala`), then the checkout for `stages`."""
    return f"{root / 'shared'}{os.pathsep}{root}"


def _states(recipe: Path, env: dict[str, str]) -> dict[str, str]:
    out = hala("run", str(recipe), "--dry-run", "--json", env=env)
    assert out.returncode == 0, out.stderr
    return {s["step"]: s["state"] for s in json.loads(out.stdout)["steps"]}


def test_a_library_module_the_stage_imports_reruns_it_and_one_it_does_not_leaves_it_cached(
    tmp_path: Path,
) -> None:
    root = _checkout_with_a_library_copy(tmp_path)
    env = {"PYTHONPATH": _pythonpath(root), "HALA_WARM": "0", "HALA_LOG_FORMAT": "json"}
    recipe = write_recipe(
        tmp_path / "r",
        {
            "prepare-lamini": {
                "stage": "prepare",
                "inputs": {"source": str(LAMINI)},
                "config": {"format": "columns", "columns": {"user": "instruction", "assistant": "response"}},
            }
        },
    )
    first = hala("run", str(recipe), env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr
    manifest = json.loads((tmp_path / "r" / "store" / "r" / "prepare-lamini" / "_MANIFEST.json").read_text())
    assert manifest["stage_version"] == _version_in(root, "prepare")  # the step used the copy's library
    assert _states(recipe, env) == {"prepare-lamini": "cached"}

    # the Kubernetes renderer: no stage imports it
    with open(root / "shared" / "hala" / "ops" / "k8s.py", "a") as f:
        f.write("\n# an edit that shapes no output\n")
    assert _states(recipe, env) == {"prepare-lamini": "cached"}

    # hala.contract.tables writes every dataset prepare commits
    with open(root / "shared" / "hala" / "contract" / "tables.py", "a") as f:
        f.write("\n# an edit to code the step runs\n")
    assert _states(recipe, env) == {"prepare-lamini": "will run"}


def _version_in(root: Path, stage: str) -> str:
    code = f"from hala.contract import stagespec; print(stagespec.find({stage!r}).version)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": _pythonpath(root)},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_what_a_stage_imports_is_read_from_its_source() -> None:
    prepare = stagespec.find("prepare")
    translate = stagespec.find("translate")
    assert prepare is not None and translate is not None

    def modules(spec: stagespec.StageSpec) -> set[str]:
        files = tuple(sorted(p for p in spec.root.rglob("*.py") if "__pycache__" not in p.parts))
        return {p.stem for p in stagespec.library_modules(files)}

    # translate runs the engine, the protected spans and the chunks; prepare none of those
    assert {"engine", "spans", "chunks", "step", "store", "tables"} <= modules(translate)
    assert {"step", "store", "tables"} <= modules(prepare) and "engine" not in modules(prepare)
    for spec in (prepare, translate):  # the operations side is never part of a stage's code
        assert not {"k8s", "compose", "images", "cli", "report", "runner", "locks"} & modules(spec)


def test_the_versions_of_result_shaping_libraries_are_part_of_the_version(
    tmp_path: Path, monkeypatch
) -> None:
    locks = tmp_path / "locks"
    shutil.copytree(REPO / "locks", locks)
    monkeypatch.setenv("HALA_LOCKS", str(locks))
    stagespec.result_libraries.cache_clear()
    try:
        before = stagespec._load(stagespec.find("translate").root / "stage.toml").version
        assert stagespec.result_libraries("serve")["transformers"]
        lock = locks / "cpu" / "serve.txt"
        pinned = stagespec.result_libraries("serve")["transformers"]
        lock.write_text(lock.read_text().replace(f"transformers=={pinned}", "transformers==99.0.0"))
        stagespec.result_libraries.cache_clear()
        after = stagespec._load(stagespec.find("translate").root / "stage.toml").version
        assert stagespec.result_libraries("serve")["transformers"] == "99.0.0"
        assert after != before
    finally:
        stagespec.result_libraries.cache_clear()
