"""The project's shape: stages declared, schemas present, environments known, the library light."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from hala.contract import stagespec
from hala.ops import envs
from helpers import REPO


def test_every_stage_is_packaged_and_documented() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    # packages are found (shared/hala and stages/); each stage's data files (stage.toml, schema) are declared
    assert "package-dir" not in setuptools, "the import path is the file path: no package-dir mapping"
    package_data = setuptools["package-data"]
    stages = stagespec.all_stages()
    assert "prepare" in stages
    for name, spec in stages.items():
        assert spec.root.parent == REPO / "stages"
        assert "*.toml" in package_data.get(f"stages.{name}", []), (
            f"add stages.{name} to pyproject's package-data"
        )
        assert spec.schema_path.exists(), f"{spec.schema_path}: run `make schemas`"
        assert spec.requirements_path.exists()
        assert (spec.root / "README.md").exists()
        assert (spec.root / "__main__.py").exists()
        assert (REPO / "tests" / "stages" / name).is_dir(), f"stage {name} has no tests/stages/{name}"


def test_environments_follow_the_stages() -> None:
    sets = envs.env_sets()
    assert {"cli", "models", "data"} <= set(sets)
    assert sets["data"].stages == ["prepare"]
    assert REPO / "stages" / "prepare" / "requirements.txt" in sets["data"].requirements
    assert REPO / "tests" / "contract" in sets["cli"].tests
    # torch is pinned exactly wherever it appears: a range pulls a multi-GB CUDA build
    for es in sets.values():
        for req in es.requirements:
            for line in req.read_text().splitlines():
                if line.split("#")[0].strip().startswith("torch"):
                    assert line.split("#")[0].strip() == "torch==2.13.0", f"{req}: {line}"


def test_the_library_imports_no_ml_stack() -> None:
    code = (
        "import sys, hala.ops.cli, hala.ops.runner, hala.ops.gather, hala.contract.step, "
        "hala.contract.sources, hala.contract.tiny, hala.contract.tiny_spec, hala.ops.launch\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm', 'datasets', 'pyarrow', 'pydantic') if "
        "m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_stage_launcher_lists_stages() -> None:
    out = subprocess.run([sys.executable, "-m", "hala.ops.launch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "prepare" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "hala.ops.launch", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no stage 'nope'" in bad.stderr


def test_no_stage_or_library_module_reaches_for_a_private_library_name() -> None:
    """The library's public names are its contract with the stages: `from hala.x import _y` or
    `hala.x._y(...)` in a stage (or in another library module) couples it to what the library may change at
    will (issue 18: two stages imported hala.contract.sources._localize_step_output)."""
    import re

    private = re.compile(
        r"from\s+hala(?:\.\w+)?\s+import\s+\(?[^)\n]*\b_[a-z]\w*"
        r"|\bhala\.\w+\._[a-z]\w*"
        r"|\b(?:runner|sources|store|step|gather|lease|tiny|tables|chunks)\._[a-z]\w*\("
    )
    found = []
    # every module of the library, in every layer (a glob of shared/*.py matched only __init__.py after the
    # layers)
    for path in sorted([*(REPO / "stages").rglob("*.py"), *(REPO / "shared").rglob("*.py")]):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if private.search(line.split("#")[0]):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "make these public or keep them inside their module:\n" + "\n".join(found)


def test_the_library_is_layered_contract_kit_ops_and_stages_import_only_the_first_two() -> None:
    """hala.contract (what every step relies on) imports nothing of the kit or the operations side; hala.kit
    (what stages import beside it) nothing of the operations side; a stage only the contract and the kit (read
    from the source as the fingerprints read it: imports inside functions count)."""
    from hala.contract import stagespec

    def layers(path) -> set[str]:
        return {
            name.split(".")[0]
            for name in stagespec._hala_imports(path)
            if "." in name or name in ("contract", "kit", "ops")
        }

    allowed = {"contract": {"contract"}, "kit": {"contract", "kit"}, "ops": {"contract", "kit", "ops"}}
    wrong = []
    for layer, ok in allowed.items():
        for path in sorted((REPO / "shared" / "hala" / layer).glob("*.py")):
            wrong += [f"{path.relative_to(REPO)} imports hala.{x}" for x in layers(path) - ok]
    for path in sorted((REPO / "stages").rglob("*.py")):
        wrong += [f"{path.relative_to(REPO)} imports hala.{x}" for x in layers(path) - allowed["kit"]]
    assert not wrong, "\n".join(wrong)
    # every module has its layer
    assert sorted(p.name for p in (REPO / "shared" / "hala").glob("*.py")) == ["__init__.py"]
