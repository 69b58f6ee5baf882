"""train, the card: the committed model's name, its folder (LoRA merged, save dtype, the base's generation
config), a sample generation that proves it loads, its model card, and the loss curve the manifest keeps.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hala.contract.step import StepContext
from stages.train.config import TrainConfig

CURVE_POINTS = 200  # the manifest keeps at most this many loss points; training_log.jsonl keeps all


def output_name(cfg: TrainConfig, ctx: StepContext) -> str:
    if cfg.name:
        return cfg.name
    ref = ctx.input("model")
    if ref.kind == "step":
        base = ref.folder_name or ref.ref.step or "model"
    elif ref.kind == "tiny":
        base = f"tiny-{ref.ref.uri}"
    else:
        base = os.path.basename(ref.uri.rstrip("/"))
    return f"{base}-SFT" + ("-LoRA" if cfg.lora else "")


def curve(history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    train = [
        {
            "step": h["step"],
            "loss": h["loss"],
            **({"learning_rate": h["learning_rate"]} if "learning_rate" in h else {}),
            **({"grad_norm": h["grad_norm"]} if "grad_norm" in h else {}),
        }
        for h in history
        if "loss" in h
    ]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]

    def thin(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(points) <= CURVE_POINTS:
            return points
        every = len(points) / CURVE_POINTS
        return [points[int(i * every)] for i in range(CURVE_POINTS - 1)] + [points[-1]]

    return {"train": thin(train), "eval": thin(evals)}


def finalize(saved: str, out: str, base: str, tok: Any, cfg: TrainConfig) -> None:
    """The committed folder: LoRA merged, weights in save_dtype, the base's inference template and generation
    config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = getattr(torch, cfg.save_dtype)
    if os.path.exists(os.path.join(saved, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(saved, dtype=dtype).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base)
    except OSError:
        pass  # the base had none: keep the one transformers derived from the config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def sample_prompt(cfg: TrainConfig) -> str:
    if cfg.sample_prompt:
        return cfg.sample_prompt
    if cfg.task == "pairs":
        return cfg.prompts()[cfg.directions[0]].replace("{text}", "The weather is nice today.")
    return "ما هي عاصمة مصر؟"


def generate(out: str, prompt: str) -> tuple[str, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    new = gen[0, enc["input_ids"].shape[1] :]
    return tok.decode(new, skip_special_tokens=True), int(new.numel())


def model_card(
    ctx: StepContext,
    cfg: TrainConfig,
    name: str,
    hyper: dict[str, Any],
    prep: dict[str, Any],
    result: dict[str, Any],
) -> str:
    base = ctx.input("model")
    rows = "\n".join(
        f"| {n} | `{r.ref.raw}` | {r.record().get('rows')} | {(cfg.mixture or {}).get(n, 1.0)} | "
        f"`{r.key[:16]}` |"
        for n, r in ctx.inputs.items()
        if n != "model"
    )
    shown = {
        k: hyper[k]
        for k in sorted(hyper)
        if k
        in {
            *cfg.trainer,
            "learning_rate",
            "num_train_epochs",
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "packing",
            "lr_scheduler_type",
            "warmup_ratio",
            "bf16",
            "seed",
        }
    }
    return (
        "---\n"
        f"base_model: {base.ref.uri if base.kind == 'hub' else base.ref.raw}\n"
        "language: [ar, en]\ntags: [hala, sft, trl" + (", lora" if cfg.lora else "") + "]\n"
        "---\n\n"
        f"# {name}\n\n"
        f"Supervised fine-tuning of `{base.ref.raw}` by the Hala pipeline's train stage (run `{ctx.run}`, "
        "step "
        f"`{ctx.step.name}`), with TRL's SFTTrainer: task `{cfg.task}`, loss on "
        f"{'the completion (translation)' if cfg.task == 'pairs' else 'assistant turns only'}"
        + (f", LoRA r={cfg.lora.r} merged into the base" if cfg.lora else ", all weights")
        + ".\n\n"
        "## Data\n\n| input | source | rows | weight | sha256 |\n| --- | --- | --- | --- | --- |\n"
        + rows
        + "\n\n"
        f"Rows used {prep['rows_used']}, quarantined {sum(prep['quarantine_by_reason'].values())} "
        f"({', '.join(f'{k} {v}' for k, v in prep['quarantine_by_reason'].items()) or 'none'}), "
        f"{prep['sequences_train']} training sequences, {prep['tokens_train']} tokens.\n\n"
        "## Hyperparameters\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in shown.items()) + "\n\n"
        "## Result\n\n"
        f"- global steps: {result['global_step']}; final training loss {result['final_loss']}"
        + (f"; eval loss {result['eval_loss']}" if result.get("eval_loss") is not None else "")
        + "\n"
        "- the loss curve is in `training_log.jsonl` and in the step's manifest\n"
    )
