"""The dry run refuses what a step refuses at start, with the same message.

Every check a stage makes on its config before doing work lives in its `config.py` (pydantic validators, and
`check_inputs(cfg, inputs)` where the config must agree with the step's inputs), a module that imports
pydantic and the library only. `recipe.load` runs them, so the CLI's dry run and the step's own start (which
loads the recipe too) give one answer. Here each check is set off on the tiny recipe twice: by `hala run
--dry-run` in the CLI's environment, and by the stage itself, `step.run(...)` with its real `main`, in the
stage's environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from hala.contract import stagespec
from hala.ops import cli, envs
from helpers import REPO, events, hala

TINY = "recipes/tiny.yaml"

# (step, --set items, what the problem says): every start-time check of every stage's config
CASES: list[tuple[str, list[str], str]] = [
    # translate
    ("translate-lamini", ["translate-lamini.prompt=no-placeholder"], "prompt must contain {text}"),
    (
        "translate-lamini",
        ["translate-lamini.sampling={temperature: 0, top_k: 5}"],
        "sampling keys ['top_k'] are unknown",
    ),
    (
        "translate-lamini",
        ["translate-lamini.gate.length_ratio=[3, 0.3]"],
        "gate.length_ratio must be [low, high]",
    ),
    (
        "translate-lamini",
        ["translate-lamini.max_model_len=140"],
        "max_model_len 140 leaves no room beside sampling.max_tokens 128",
    ),
    (
        "translate-lamini",
        ["translate-lamini.direction=english-arabic"],
        "direction: unknown language 'english'",
    ),
    ("translate-lamini", ["translate-lamini.direction=en"], "direction 'en': write SOURCE-TARGET"),
    ("translate-lamini", ["translate-lamini.target=en"], "source and target are both 'en'"),
    (
        "translate-lamini",
        ["translate-lamini.prompt=Into {lang} {text}"],
        "prompt: only {text}, {source} and {target} are filled in",
    ),
    # judge
    ("judge-opus100", ["judge-opus100.prompt=Is {src} right?"], "prompt must contain {src} and {tgt}"),
    (
        "judge-opus100",
        ["judge-opus100.prompt=In {lang} {src} {tgt}"],
        "prompt: only {src}, {tgt}, {src_lang} and {tgt_lang} are filled in",
    ),
    ("judge-opus100", ["judge-opus100.labels=[GOOD, GOOD]"], "labels must differ"),
    # evaluate
    ("evaluate-translator", ["evaluate-translator.prompt=Translate."], "prompt has no {text} placeholder"),
    (
        "evaluate-translator",
        ["evaluate-translator.kind=fp8_acceptance"],
        "kind fp8_acceptance needs input 'reference'",
    ),
    ("evaluate-hala-350m", ["evaluate-hala-350m.kind=translation"], "kind translation needs input 'data'"),
    # merge
    ("merge-hala-350m", ["merge-hala-350m.t=1.7"], "t must lie in [0, 1]"),
    (
        "merge-hala-350m",
        ["merge-hala-350m.t=[{filter: self_attn, value: [0.1, -0.5]}, {value: 0.5}]"],
        "the setting has -0.5",
    ),
    (
        "merge-hala-350m",
        ["merge-hala-350m.mergekit={merge_method: slerp}"],
        "give either mergekit or method/t, not both",
    ),
    (
        "merge-hala-700m",
        [
            "merge-hala-700m.t=null",
            "merge-hala-700m.method=null",
            "merge-hala-700m.mergekit={merge_method: ties, models: [a, b]}",
        ],
        "merge_method 'ties' is not supported",
    ),
    (
        "merge-hala-700m",
        [
            "merge-hala-700m.t=null",
            "merge-hala-700m.method=null",
            "merge-hala-700m.mergekit={merge_method: slerp, base_model: a, models: [a, b]}",
        ],
        "slerp needs parameters.t",
    ),
    (
        "merge-hala-700m",
        [
            "merge-hala-700m.t=null",
            "merge-hala-700m.method=null",
            "merge-hala-700m.mergekit={merge_method: linear, base_model: a, "
            "models: [{model: a, parameters: {weight: -1}}, {model: b, parameters: {weight: 1}}]}",
        ],
        "linear weights must be >= 0",
    ),
    # prepare
    (
        "prepare-lamini",
        ["prepare-lamini.columns={user: instruction, answer: response}"],
        "mean nothing for format columns",
    ),
    ("prepare-lamini", ["prepare-lamini.columns={assistant: response}"], "format columns needs columns.user"),
    (
        "prepare-hermes3",
        ["prepare-hermes3.roles={human: boss}"],
        "roles map to system, user, assistant, tool or tool_call",
    ),
    # publish
    ("publish-hala", ["publish-hala.names={hala_3b: Hala-3B}"], "names for hala_3b, which are not inputs"),
    (
        "publish-hala",
        ["publish-hala.inputs.notes=recipes/samples/pairs.en-ar.tsv"],
        "input 'notes' (recipes/samples/pairs.en-ar.tsv) is not a step output",
    ),
    # quantize
    ("quantize-teacher", ["quantize-teacher.scheme=FP8"], "give the step an input 'calibration'"),
    (
        "quantize-teacher",
        ["quantize-teacher.algorithm=gptq"],
        "scheme FP8_DYNAMIC with algorithm gptq measures activations",
    ),
    ("quantize-teacher", ["quantize-teacher.prompt=Translate."], "prompt has no {text} placeholder"),
    # train
    (
        "train-hala-350m",
        ["train-hala-350m.mixture={data_openorca: 2, data_nope: 1}"],
        "mixture names data_nope, which are not data inputs",
    ),
    (
        "train-hala-350m",
        ["train-hala-350m.mixture={data_openorca: 0}"],
        "mixture weight of 'data_openorca' is 0",
    ),
    (
        "train-hala-350m",
        ["train-hala-350m.trainer.output_dir=/tmp/elsewhere"],
        "output_dir: set by the stage",
    ),
    (
        "train-hala-350m",
        ["train-hala-350m.trainer.lerning_rate=0.001"],
        "unknown key 'lerning_rate' in config.trainer (did you mean 'learning_rate'?)",
    ),
    ("train-hala-350m", ["train-hala-350m.prompt=Translate {text}"], "prompt is for task pairs"),
    ("train-translator", ["train-translator.directions=[english-arabic]"], "expected SRC-TGT language codes"),
    ("train-translator", ["train-translator.prompt=null"], "task pairs needs a prompt with {text}"),
    (
        "train-translator",
        [
            "train-translator.prompt={en-ar: 'To Arabic: {text}'}",
            "train-translator.directions=[en-ar, ar-en]",
        ],
        "prompt has no entry for direction ar-en",
    ),
    (
        "train-translator",
        ["train-translator.prompt=Into Arabic please"],
        "prompt for en-ar has no {text} placeholder",
    ),
    (
        "train-translator",
        ["train-translator.trainer.packing=true", "train-translator.trainer.max_length=null"],
        "trainer.packing needs trainer.max_length",
    ),
]
# a case for each stage's tests of its inputs (a step without any data input cannot be written with --set)
INPUT_CHECKS_WITHOUT_A_CASE = {"publish: nothing to publish", "train: no data inputs"}


def _stage(step: str) -> str:
    return step.split("-")[0]


def _dry_run(items: list[str], capsys: pytest.CaptureFixture, store: Path) -> tuple[int, str]:
    """`hala run recipes/tiny.yaml --dry-run --set ...`, in this process (the CLI's code, its exit code)."""
    argv = ["run", TINY, "--dry-run", "--store", str(store)]
    for item in items:
        argv += ["--set", item]
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _problem(text: str, step: str) -> str:
    """The problem line naming the step, from a report of one problem."""
    found = re.findall(rf"step '{re.escape(step)}': .*", text)
    assert len(found) == 1, f"expected one problem under step {step!r}, got: {text}"
    return found[0]


@pytest.fixture(scope="module")
def at_start(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[int, str]]:
    """Every case run by its stage, in the stage's environment: `step.run(stage, Config, main)`, the stages'
    entrypoint. One process per environment runs its cases (side by side, two at a time)."""
    tmp = tmp_path_factory.mktemp("start")
    by_env: dict[str, list[int]] = defaultdict(list)
    for i, (step, _, _) in enumerate(CASES):
        spec = stagespec.find(_stage(step))
        assert spec is not None
        by_env[spec.env].append(i)
    driver = (
        "import importlib, json, sys\n"
        "from hala.contract import stagespec, step\n"
        "cases = json.loads(sys.argv[1])\n"
        "for i, stage, argv in cases:\n"
        "    spec = stagespec.find(stage)\n"
        "    main = importlib.import_module(f'stages.{stage}.main').main\n"
        "    print(f'### case {i}', flush=True)\n"
        "    code = step.run(stage, spec.config_model(), main, argv)\n"
        "    print(f'### exit {i} {code}', flush=True)\n"
    )
    procs = []
    pending = sorted(by_env.items(), key=lambda kv: -len(kv[1]))
    results: dict[int, tuple[int, str]] = {}

    def collect(proc: subprocess.Popen, env: str) -> None:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{env}: {err[-3000:]}"
        for block in out.split("### case ")[1:]:
            head, _, rest = block.partition("\n")
            i = int(head)
            code = int(re.search(rf"### exit {i} (-?\d+)", rest).group(1))
            failed = [e for e in events(rest) if e.get("event") == "failed"]
            results[i] = (code, failed[0]["error"] if failed else "")

    for env, idx in pending:
        cases = []
        for i in idx:
            step, items, _ = CASES[i]
            argv = ["--recipe", TINY, "--step", step, "--store", str(tmp / f"store-{i}")]
            for item in items:
                argv += ["--set", item]
            cases.append([i, _stage(step), argv])
        procs.append(
            (
                subprocess.Popen(
                    [str(envs.python_for(env)), "-c", driver, json.dumps(cases)],
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "HALA_LOG_FORMAT": "json", "HALA_WARM": "0"},
                ),
                env,
            )
        )
        if len(procs) == 2:
            collect(*procs.pop(0))
    for proc, env in procs:
        collect(proc, env)
    return results


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}:{c[2][:40]}" for c in CASES])
def test_the_dry_run_refuses_what_the_step_refuses_at_start(
    index: int, at_start: dict[int, tuple[int, str]], capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    step, items, says = CASES[index]
    code, err = _dry_run(items, capsys, tmp_path / "store")
    assert code == 2, err
    planned = _problem(err, step)
    assert says in planned, planned
    stage_code, stage_error = at_start[index]
    assert stage_code == 2, stage_error
    assert _problem(stage_error, step) == planned
    assert not (tmp_path / "store").exists()  # a refused plan writes nothing


def test_every_check_of_every_stage_config_has_a_case() -> None:
    # a check added to a config.py without a case here fails this count: add the case above
    for spec in stagespec.all_stages().values():
        checks = (spec.root / "config.py").read_text().count("raise ValueError(")
        cases = sum(1 for step, _, _ in CASES if _stage(step) == spec.name)
        uncovered = sum(1 for c in INPUT_CHECKS_WITHOUT_A_CASE if c.startswith(spec.name + ":"))
        assert cases + uncovered >= checks, (
            f"stage {spec.name}: {checks} checks in its config.py, {cases} cases here"
        )


def test_config_modules_import_without_the_stages_libraries() -> None:
    # what lets any environment (the CLI's, a laptop's dry run of the paper recipe) run the stages' own checks
    code = (
        "import sys\nfrom hala.contract import stagespec\n"
        "for spec in stagespec.all_stages().values(): spec.config_model()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'vllm', 'datasets', 'pyarrow', "
        "'llmcompressor', "
        "'compressed_tensors', 'lighteval', 'huggingface_hub', 'safetensors') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([str(envs.python_for("cli")), "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_issue_examples_as_commands(tmp_path: Path) -> None:
    # the exact commands: a prompt without {text} and slerp outside [0, 1] are refused, exit 2, before
    # anything runs
    for item, says in [
        (
            "translate-lamini.prompt=no-placeholder",
            "step 'translate-lamini': config: prompt must contain {text}",
        ),
        ("merge-hala-350m.t=1.7", "step 'merge-hala-350m': config: t must lie in [0, 1]"),
    ]:
        out = hala("run", TINY, "--dry-run", "--json", "--store", str(tmp_path), "--set", item)
        assert out.returncode == 2, out.stderr
        # one problem, under the step that was changed
        assert says in out.stderr and "1 problem" not in out.stderr
