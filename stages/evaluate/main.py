"""evaluate: one of three measurements, every number and its provenance into the manifest.

- translation: model (and base) translate a parallel set; BLEU and chrF++ (sacrebleu) of each, the difference;
- fp8_acceptance: the FP8 model and its source translate the same set with the serving engine; the chrF++
  drop must stay within `max_quality_drop` (else exit 3) and the throughput ratio is recorded;
- benchmarks: the OALL v2 tasks through LightEval, model and base, per task, per family, average.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hala.contract import tables
from hala.contract.errors import DataError
from hala.contract.step import StepContext
from hala.kit.engine import check_fp8_hardware
from stages.evaluate import benchmarks, translation
from stages.evaluate.config import EvaluateConfig


def model_path(ctx: StepContext, side: str) -> str:
    """The model input as a path or hub id; a local folder that is not a model fails here, naming it."""
    path = ctx.model_path(side)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(
            f"step '{ctx.step.name}': input '{side}' ({ctx.input(side).ref.raw}) is {path}, which has no "
            "config.json: not a Hugging Face model folder (a model output of train, merge or quantize is)"
        )
    check_fp8_hardware(path)  # every kind: LightEval's engine starts in a subprocess, so check before it
    return path


def device() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(),
            "capability": f"{major}.{minor}",
            "fp8_native": (major, minor) >= (8, 9),
        }
    return {
        "type": "cpu",
        "fp8_native": False,
        "note": "FP8 on CPU is emulated: throughput here says nothing about a GPU",
    }


def write_translations(ctx: StepContext, pairs: translation.Pairs, columns: dict[str, list[str]]) -> None:
    import pyarrow as pa

    rows = [
        {"id": i, "src": s, "ref": r, **{k: v[n] for k, v in columns.items()}}
        for n, (i, s, r) in enumerate(zip(pairs.ids, pairs.src, pairs.ref))
    ]
    schema = pa.schema(
        [("id", pa.string()), ("src", pa.string()), ("ref", pa.string())]
        + [(k, pa.string()) for k in columns]
    )
    tables.write(os.path.join(ctx.output_dir("translations"), "translations.parquet"), rows, schema)
    ctx.set_output("translations", rows=len(rows), format="parquet")


def run_translation(cfg: EvaluateConfig, ctx: StepContext) -> dict[str, Any]:
    pairs = translation.read_pairs(
        ctx.input("data").row_groups(), cfg, f"step '{ctx.step.name}' input 'data'"
    )
    result: dict[str, Any] = {
        "rows": len(pairs.ids),
        "skipped": pairs.skipped,
        "direction": cfg.direction,
        "prompt": cfg.prompt,
    }
    columns = {}
    for side in ("model", "base"):
        if side == "base" and not ctx.has_input("base"):
            continue
        out = translation.translate(model_path(ctx, side), pairs, cfg)
        columns[f"hyp_{side}"] = out.pop("hyps")
        result[side] = {
            **translation.score(columns[f"hyp_{side}"], pairs.ref, cfg.tokenize),
            **out,
            "input": ctx.input(side).record(),
        }
        ctx.log.info("scored", side=side, bleu=result[side]["bleu"], chrf=result[side]["chrf++"])
    if "base" in result:
        result["difference"] = {
            m: round(result["model"][m] - result["base"][m], 2) for m in ("bleu", "chrf++")
        }
    write_translations(ctx, pairs, columns)
    return result


def run_fp8(cfg: EvaluateConfig, ctx: StepContext) -> dict[str, Any]:
    pairs = translation.read_pairs(
        ctx.input("data").row_groups(), cfg, f"step '{ctx.step.name}' input 'data'"
    )
    sides = {}
    columns = {}
    for side in ("reference", "model"):
        out = translation.translate(model_path(ctx, side), pairs, cfg)
        columns[f"hyp_{side}"] = out.pop("hyps")
        sides[side] = {
            **translation.score(columns[f"hyp_{side}"], pairs.ref, cfg.tokenize),
            **out,
            "input": ctx.input(side).record(),
        }
    ref, fp8 = sides["reference"], sides["model"]
    drop = round(ref["chrf++"] - fp8["chrf++"], 2)
    result = {
        "rows": len(pairs.ids),
        "reference": ref,
        "fp8": fp8,
        "device": device(),
        "chrf_drop": drop,
        "bleu_drop": round(ref["bleu"] - fp8["bleu"], 2),
        "max_quality_drop": cfg.max_quality_drop,
        "throughput_ratio": round(fp8["tokens_per_second"] / max(ref["tokens_per_second"], 1e-9), 3),
        "identical_outputs": sum(a == b for a, b in zip(columns["hyp_reference"], columns["hyp_model"])),
        "accepted": drop <= cfg.max_quality_drop,
    }
    write_translations(ctx, pairs, columns)
    # kept even when the check fails below: the manifest is not written then, the log is
    ctx.metrics.update(result)
    ctx.log.info(
        "fp8 acceptance",
        chrf_drop=drop,
        throughput_ratio=result["throughput_ratio"],
        accepted=result["accepted"],
        emulated=not result["device"]["fp8_native"],
    )
    if not result["accepted"]:
        raise DataError(
            f"step '{ctx.step.name}': the FP8 model loses {drop} chrF++ points against its source "
            f"({fp8['chrf++']} vs {ref['chrf++']}), more than max_quality_drop {cfg.max_quality_drop}"
        )
    return result


def run_benchmarks(cfg: EvaluateConfig, ctx: StepContext, out_dir: str) -> dict[str, Any]:
    data = ctx.input("benchmarks").local_path() if ctx.has_input("benchmarks") else None
    names, bad_data = benchmarks.task_names(data, cfg.tasks)
    for task, found in bad_data.items():
        ctx.log.error(
            "task left out: its data has rows the task cannot read",
            task=task,
            problems=found[:5],
            count=len(found),
        )
    if not names and bad_data:
        raise DataError(
            f"step '{ctx.step.name}': no task could be scored; every task's data has problems: "
            + "; ".join(f"{t}: {p[0]}" for t, p in bad_data.items())
        )
    if not names:
        raise DataError(
            f"step '{ctx.step.name}': none of the tasks {', '.join(cfg.tasks)} has data"
            + (
                f" under {data} (expected <org>/<name>/README.md folders, e.g. OALL/Arabic_EXAMS)"
                if data
                else ""
            )
        )
    result: dict[str, Any] = {
        "harness": "lighteval 0.13.0",
        "tasks_run": names,
        "few_shot": cfg.few_shot,
        "chat_template": cfg.chat_template,
        "metric": "acc_norm (log-likelihood, character-normalised)",
        "data": "local copy" if data else "Hugging Face Hub",
        "data_origin": cfg.trust_data_origin,
        "max_samples": cfg.max_samples,
    }
    sides = ["model", "base"] if ctx.has_input("base") else ["model"]
    models = {side: model_path(ctx, side) for side in sides}
    scored = benchmarks.evaluate_models(
        models, names, cfg, {s: os.path.join(out_dir, f"lighteval-{s}") for s in sides}, ctx.log, data
    )
    for side in sides:
        r = scored[side]
        r["failures"].update(
            {
                t: f"data: {'; '.join(p[:5])}" + (f" (+{len(p) - 5} more)" if len(p) > 5 else "")
                for t, p in bad_data.items()
            }
        )
        r["average"] = benchmarks.average(r["families"])
        r["input"] = ctx.input(side).record()
        result[side] = r
        ctx.log.info("benchmarks scored", side=side, average=r["average"], failures=len(r["failures"]))
    if not result["model"]["tasks"]:
        raise DataError(
            f"step '{ctx.step.name}': no task could be scored: "
            f"{json.dumps(result['model']['failures'])[:2000]}"
        )
    if "base" in result and result["base"]["average"] is not None and result["model"]["average"] is not None:
        result["difference"] = {
            "average": round(result["model"]["average"] - result["base"]["average"], 4),
            **{
                f: round(v - result["base"]["families"].get(f, 0.0), 4)
                for f, v in result["model"]["families"].items()
                if f in result["base"]["families"]
            },
        }
    return result


def main(cfg: EvaluateConfig, ctx: StepContext) -> None:
    out_dir = ctx.output_dir("results")
    if cfg.kind == "translation":
        result = run_translation(cfg, ctx)
    elif cfg.kind == "fp8_acceptance":
        result = run_fp8(cfg, ctx)
    else:
        result = run_benchmarks(cfg, ctx, out_dir)
    result["kind"] = cfg.kind
    benchmarks.write(os.path.join(out_dir, "scores.json"), result)
    ctx.set_output("results", rows=None, format="json")
    ctx.metrics.update(result)
