"""The Arabic benchmarks through LightEval's Python API, offline.

Scoring is the leaderboard's: every OALL v2 task is multiple choice scored by log-likelihood, accuracy with
LightEval's character-length normalisation (acc_norm). A family's score is the mean over its subsets that
ran (the leaderboard's macro average); the step's average is the mean over families.

Known LightEval 0.13 traps handled here (../shared/research/eval.md): its registry imports every task
module at start-up and one of them downloads a file (stubbed out); its sample cache keys on the model *path*,
so an absolute path would put the cache inside the model folder and return stale scores for a retrained
model at the same path: the model is given as a relative path from a private working folder, and the cache
lives and dies with that folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from stages.evaluate.config import EvaluateConfig


def _offline_registry() -> None:
    # tiny_benchmarks.py fetches a pickle from GitHub when imported; no run here uses it
    sys.modules.setdefault(
        "lighteval.tasks.tasks.tiny_benchmarks", types.ModuleType("lighteval.tasks.tasks.tiny_benchmarks")
    )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        import nltk

        # task modules ask for punkt at import; offline that is a wait for nothing
        nltk.download = lambda *a, **k: False


def offline(models: list[str], data: str | None) -> bool:
    """Local models and local data: nothing to fetch, so the Hub libraries must not try."""
    return bool(data) and all(os.path.isdir(m) for m in models)


def configure_hub(offline: bool, datasets_cache: str) -> None:
    """The Hub libraries' switches for this LightEval run: offline, and a private datasets cache (datasets
    keys a local folder's cache on its name and file names, so an edited or another copy of OALL/Arabic_EXAMS
    would be read from an older cache). The variables serve a fresh interpreter, which has not imported the
    libraries yet; under `hala run` this process is forked from a warm interpreter (hala.kit.warm) that
    imported them already, and their import-time copies of the same switches are set as well."""
    os.environ["HF_DATASETS_CACHE"] = datasets_cache
    if offline:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and offline:
        hub.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_DATASETS_CACHE = Path(datasets_cache)
        ds.DOWNLOADED_DATASETS_PATH = Path(datasets_cache) / ds.DOWNLOADED_DATASETS_DIR
        ds.EXTRACTED_DATASETS_PATH = ds.DOWNLOADED_DATASETS_PATH / ds.EXTRACTED_DATASETS_DIR
        if offline:
            ds.HF_HUB_OFFLINE = ds.HF_DATASETS_OFFLINE = True


def task_names(data: str | None, tasks: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The concrete tasks (family:subset) that will run, with local data only the subsets it has and whose
    rows check out; and the tasks left out, with their problems (file:line: what)."""
    _offline_registry()
    from stages.evaluate import oall_tasks

    problems: dict[str, list[str]] = {}
    return [c.name for c in oall_tasks.build(data, tasks, problems)], problems


@contextlib.contextmanager
def _in(folder: str):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _accuracy(metrics: dict[str, Any]) -> float | None:
    for key, value in metrics.items():
        if key.startswith("acc") and not key.endswith("_stderr"):
            return float(value)
    return None


def run_lighteval(
    models: dict[str, str],
    names: list[str],
    cfg: EvaluateConfig,
    out_dirs: dict[str, str],
    data: str | None,
    hub_offline: bool = False,
) -> dict[str, dict[str, float]]:
    """Scores of each model ({side: folder}) on the named tasks, one LightEval pipeline after the other in
    this (fresh) process; raises on any failure. The sides share the task registry and the datasets cache (the
    same tasks on the same data), never a sample cache: each has its own name and cache folder."""
    with tempfile.TemporaryDirectory(prefix="hala-lighteval-") as work:
        configure_hub(hub_offline, os.path.join(work, "datasets"))
        # LightEval imports GitPython, which refuses to import without a git executable (the stage images have
        # none): "quiet" lets it import; nothing here uses git
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        _offline_registry()
        from lighteval.logging.evaluation_tracker import EvaluationTracker
        from lighteval.models.transformers.transformers_model import TransformersModelConfig
        from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters

        out: dict[str, dict[str, float]] = {}
        for side, model in models.items():
            # the model by a name relative to the private folder: LightEval's sample cache keys on it
            os.symlink(os.path.abspath(model), os.path.join(work, side))
            with _in(work):
                from stages.evaluate.oall_tasks import tasks_file

                params = PipelineParameters(
                    launcher_type=ParallelismManager.ACCELERATE,
                    custom_tasks_directory=tasks_file(work, data, names),
                    max_samples=cfg.max_samples,
                )
                if cfg.benchmark_engine == "vllm":
                    from lighteval.models.custom.custom_model import CustomModelConfig

                    os.environ["HALA_LIGHTEVAL_VLLM"] = json.dumps(
                        {
                            "dtype": cfg.dtype,
                            "max_model_len": cfg.max_model_len,
                            "engine_args": cfg.engine_args,
                            "chat_template": cfg.chat_template,
                        }
                    )
                    model_cfg = CustomModelConfig(
                        model_name=side,
                        model_definition_file_path=str(Path(__file__).with_name("lighteval_vllm.py")),
                    )
                else:
                    model_cfg = TransformersModelConfig(
                        model_name=side,
                        device="cpu" if not _cuda() else "cuda",
                        dtype="float32" if not _cuda() else "bfloat16",
                        batch_size=cfg.benchmark_batch_size,
                        override_chat_template=cfg.chat_template,
                        cache_dir=os.path.join(work, f"cache-{side}"),
                    )
                pipeline = Pipeline(
                    tasks=",".join(f"{n}|{cfg.few_shot}" for n in names),
                    pipeline_parameters=params,
                    evaluation_tracker=EvaluationTracker(output_dir=out_dirs[side], save_details=True),
                    model_config=model_cfg,
                )
                pipeline.evaluate()
                pipeline.save_and_push_results()
                results = pipeline.get_results()["results"]
                del pipeline  # the model's memory goes before the next side's loads
            out[side] = _scores(results, names)
    return out


def _scores(results: dict[str, Any], names: list[str]) -> dict[str, float]:
    scores = {}
    for key, metrics in results.items():
        # "<task>:<few_shot>" from get_results (the saved file says "<task>|<few_shot>"); "all" is LightEval's
        # mean
        name = key.rsplit(":", 1)[0] if key.rsplit(":", 1)[-1].isdigit() else key.rsplit("|", 1)[0]
        if name in names:
            acc = _accuracy(metrics)
            if acc is not None:
                scores[name] = acc
    return scores


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_isolated(
    models: dict[str, str],
    names: list[str],
    cfg: EvaluateConfig,
    out_dirs: dict[str, str],
    data: str | None,
    hub_offline: bool = False,
) -> dict[str, dict[str, float]]:
    """run_lighteval in a process of its own: LightEval keeps registered tasks for the life of a process, so a
    later pipeline in the same process would reuse the first one's task configs (and their data folders). One
    process serves the sides of one step (same tasks, same data): its ~20 s of imports are paid once, or not
    at all under `hala run`, where it is forked from the step's warm interpreter (hala.kit.warm)."""
    from hala.kit import warm

    request = json.dumps(
        {
            "models": models,
            "names": names,
            "config": cfg.model_dump(),
            "out_dirs": out_dirs,
            "data": data,
            "hub_offline": hub_offline,
        }
    )
    proc = warm.popen(
        [sys.executable, "-m", "stages.evaluate.benchmarks"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(request)
    if proc.returncode != 0:
        lines = [x for x in err.strip().splitlines() if x.strip()]
        # vLLM's root cause comes lines before the last
        causes = [x for x in lines if "Error" in x or "error" in x][-3:]
        raise RuntimeError(
            " | ".join(dict.fromkeys(causes + lines[-1:]))[-1500:]
            if lines
            else f"LightEval exited with {proc.returncode}"
        )
    return json.loads(out.strip().splitlines()[-1])


def evaluate_models(
    models: dict[str, str],
    names: list[str],
    cfg: EvaluateConfig,
    out_dirs: dict[str, str],
    log: Any,
    data: str | None,
) -> dict[str, dict[str, Any]]:
    """Every side's tasks in one process; when that fails, side by side and family by family, so one broken
    task does not sink the rest (its failure is recorded, the others are scored)."""
    t0 = time.monotonic()
    hub_offline = offline(list(models.values()), data)
    try:
        together = run_isolated(models, names, cfg, out_dirs, data, hub_offline)
    except Exception as e:  # noqa: BLE001 - isolate the failing side and family below
        log.warning(
            "a task failed; scoring side by side, family by family", error=f"{type(e).__name__}: {e}"[:500]
        )
        return {
            side: evaluate_model(side, model, names, cfg, out_dirs[side], log, data, hub_offline)
            for side, model in models.items()
        }
    seconds = round((time.monotonic() - t0) / max(len(models), 1), 1)  # one process: its time shared out
    return {side: _result(together.get(side, {}), {}, names, seconds) for side in models}


def evaluate_model(
    side: str,
    model: str,
    names: list[str],
    cfg: EvaluateConfig,
    out_dir: str,
    log: Any,
    data: str | None,
    hub_offline: bool = False,
) -> dict[str, Any]:
    """One side family by family, each in its own process."""
    t0 = time.monotonic()
    failures: dict[str, str] = {}
    scores: dict[str, float] = {}
    for family in sorted({n.split(":")[0] for n in names}):
        members = [n for n in names if n.split(":")[0] == family]
        try:
            scores.update(run_isolated({side: model}, members, cfg, {side: out_dir}, data, hub_offline)[side])
        except Exception as fe:  # noqa: BLE001 - recorded in the manifest, the other families still run
            failures[family] = f"{type(fe).__name__}: {fe}"[:1000]
    return _result(scores, failures, names, round(time.monotonic() - t0, 1))


def _result(
    scores: dict[str, float], failures: dict[str, str], names: list[str], seconds: float
) -> dict[str, Any]:
    missing = [n for n in names if n not in scores and n.split(":")[0] not in failures]
    for n in missing:
        failures[n] = "LightEval returned no accuracy for this task"
    return {"tasks": scores, "families": families(scores), "failures": failures, "seconds": seconds}


def families(scores: dict[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for name, value in scores.items():
        groups.setdefault(name.split(":")[0], []).append(value)
    return {f: round(sum(v) / len(v), 4) for f, v in sorted(groups.items())}


def average(fams: dict[str, float]) -> float | None:
    return round(sum(fams.values()) / len(fams), 4) if fams else None


def write(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    # one LightEval run: a JSON request on stdin, the scores as the last line of stdout (see run_isolated)
    req = json.loads(sys.stdin.read())
    with contextlib.redirect_stdout(
        sys.stderr
    ):  # LightEval prints its tables; stdout carries only the answer
        result = run_lighteval(
            req["models"],
            req["names"],
            EvaluateConfig(**req["config"]),
            req["out_dirs"],
            req["data"],
            req.get("hub_offline", False),
        )
    print(json.dumps(result))
