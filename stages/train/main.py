"""train: setup -> tokenized data -> SFTTrainer (resumes from the work area) -> commit (save, card, sample).

The recipe's shape is torchtune's (setup, train, cleanup), as four functions over four modules: `setup.py`
(the tokenizer, its training template, SFTConfig and LoRA), `tokenized.py` (the content-addressed tokenized
cache), `train` here, and `card.py` (the committed folder, its card and sample generation); `commit` here
records it.

Every rank of a multi-GPU run executes `main`; tokenization happens on the main process first (the others then
read the cache), and only the main process writes the output and the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from hala.contract import tables
from hala.contract.errors import DataError
from hala.contract.step import StepContext, rank
from stages.train import card, checkpoints, setup, tokenized
from stages.train.config import TrainConfig


@dataclass
class Setup:
    base: str  # the base model's local folder
    tok: Any
    template: str
    template_source: str
    area: checkpoints.Area
    folder: str  # the tokenized data's local folder (train/, eval/, quarantine.parquet)
    prep: dict[str, Any]  # the tokenized data's metrics


@dataclass
class Trained:
    trainer: Any
    args: Any
    output: Any  # TrainOutput
    resume: tuple[str, int] | None
    train_seconds: float
    tokens_seen: int  # this process's share
    eval_loss: float | None
    saved: str  # the trainer's saved folder (every rank saves: FSDP gathers the full state dict)


def prepare(cfg: TrainConfig, ctx: StepContext) -> Setup:
    """The tokenizer and template, the work area, and the tokenized data (built once per cache key)."""
    base = ctx.model_path("model")
    tok = setup.load_tokenizer(base, cfg, ctx)
    template, template_source = setup.training_template(tok, cfg, ctx)
    area = checkpoints.Area(ctx.store, ctx.work)
    # SFTConfig's effective values (its defaults too: max_length is 1024 unless set) shape the tokenized data
    probe = setup.make_sft_config(setup.sft_kwargs(cfg, area.dir, has_eval=False), ctx)
    sft = {k: getattr(probe, k) for k in tokenized.SFT_DATA_FIELDS}
    folder, prep = tokenized.ensure(cfg, ctx, tok, template, sft)
    return Setup(base, tok, template, template_source, area, folder, prep)


def train(cfg: TrainConfig, ctx: StepContext, s: Setup) -> Trained:
    """SFTTrainer on the tokenized data, resumed from the newest complete checkpoint of the work area."""
    from datasets import load_from_disk
    from transformers import PrinterCallback
    from trl import SFTTrainer

    train_ds = load_from_disk(os.path.join(s.folder, "train"))
    eval_ds = (
        load_from_disk(os.path.join(s.folder, "eval"))
        if os.path.isdir(os.path.join(s.folder, "eval"))
        else None
    )
    if len(train_ds) == 0:
        raise DataError(
            f"step '{ctx.step.name}': no row is left to train on; the quarantine has "
            f"{s.prep['quarantine_by_reason']} (see {s.prep['cache']}/data/quarantine.parquet)"
        )
    args = setup.make_sft_config(setup.sft_kwargs(cfg, s.area.dir, has_eval=eval_ds is not None), ctx)
    resume = s.area.latest()
    trainer = SFTTrainer(
        model=s.base,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=s.tok,
        peft_config=setup.lora_config(cfg),
    )
    trainer.model.config.use_cache = False
    trainer.remove_callback(PrinterCallback)  # the Report callback logs the same dicts as structured events
    with ctx.progress(args.max_steps if args.max_steps > 0 else None, unit="steps", what="train") as progress:
        trainer.add_callback(checkpoints.Mark(s.area, ctx.log, ctx.check_lease))
        trainer.add_callback(checkpoints.Report(progress, ctx.log))
        if resume:
            ctx.log.info("resuming", checkpoint=resume[0], global_step=resume[1])
        t0 = time.monotonic()
        output = trainer.train(resume_from_checkpoint=resume[0] if resume else None)
        train_seconds = time.monotonic() - t0
    report = next(c for c in trainer.callback_handler.callbacks if isinstance(c, checkpoints.Report))
    tokens_seen = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0) - report.tokens_at_start
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ds is not None else None
    saved = os.path.join(
        s.area.dir if ctx.store.is_local else tempfile.mkdtemp(prefix="hala-train-final-"), "final"
    )
    trainer.save_model(saved)  # every rank: FSDP gathers the full state dict here
    return Trained(trainer, args, output, resume, train_seconds, tokens_seen, eval_loss, saved)


def commit(cfg: TrainConfig, ctx: StepContext, s: Setup, t: Trained) -> None:
    """The main process: the model folder with its log and card, a sample generation, the quarantine, the
    manifest."""
    name = card.output_name(cfg, ctx)
    folder_out = ctx.output_dir("model", folder=name)
    # inference template: the model's own when it had one
    s.tok.chat_template = s.tok.chat_template or s.template
    card.finalize(t.saved, folder_out, s.base, s.tok, cfg)
    state, hyper = t.trainer.state, t.args.to_dict()
    history = state.log_history
    with open(os.path.join(folder_out, "training_log.jsonl"), "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    losses = [h["loss"] for h in history if "loss" in h]
    result = {
        "global_step": state.global_step,
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "train_loss": t.output.training_loss,
        "eval_loss": t.eval_loss,
    }
    with open(os.path.join(folder_out, "README.md"), "w", encoding="utf-8") as f:
        f.write(card.model_card(ctx, cfg, name, hyper, s.prep, result))
    prompt = card.sample_prompt(cfg)
    answer, new_tokens = card.generate(folder_out, prompt)
    shutil.rmtree(t.saved, ignore_errors=True)

    import pyarrow.parquet as pq

    q_rows = pq.read_table(os.path.join(s.folder, "quarantine.parquet")).to_pylist()
    tables.write(
        os.path.join(ctx.output_dir("quarantine"), "quarantine.parquet"), q_rows, tables.quarantine_schema()
    )
    for row in q_rows:
        ctx.quarantine(row["reason"])
    prep = s.prep
    removed = {"mixture_sampled_out": prep["rows_sampled_out"]} if prep["rows_sampled_out"] else {}
    ctx.count(
        rows_in=sum(prep["rows_in"].values()),
        rows_out=prep["rows_used"],
        rows_quarantined=len(q_rows),
        rows_removed=removed,
    )
    ctx.set_output("quarantine", rows=len(q_rows), format="parquet", schema="quarantine")
    ctx.set_output("model", rows=None, format="safetensors", model_name=name, task=cfg.task)
    ctx.timings["train_seconds"] = round(t.train_seconds, 3)
    shown = {
        "learning_rate",
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "packing",
        "bf16",
        "seed",
        "lr_scheduler_type",
        "save_steps",
    }
    ctx.metrics.update(
        name=name,
        base=ctx.input("model").record(),
        task=cfg.task,
        chat_template=s.template_source,
        lora=cfg.lora.model_dump() if cfg.lora else None,
        resumed_from_step=t.resume[1] if t.resume else None,
        tokenized=prep,
        trainer={k: hyper[k] for k in sorted(hyper) if k in cfg.trainer or k in shown},
        world_size=t.args.world_size,
        device=str(t.args.device),
        **result,
        tokens_trained=t.tokens_seen,
        train_tokens_per_second=round(t.tokens_seen / max(t.train_seconds, 1e-9), 1),
        loss_curve=card.curve(history),
        sample={"prompt": prompt, "output": answer, "new_tokens": new_tokens},
    )
    if new_tokens == 0:
        raise DataError(
            f"step '{ctx.step.name}': the trained model {name} generated no token for the sample prompt "
            f"{prompt!r}"
        )
    if not answer.strip():  # loads and runs, but stops at once: worth a look, not a broken checkpoint
        ctx.log.warning(
            "the trained model answered the sample prompt with only special tokens",
            prompt=prompt,
            new_tokens=new_tokens,
        )


def main(cfg: TrainConfig, ctx: StepContext) -> None:
    s = prepare(cfg, ctx)
    t = train(cfg, ctx, s)
    if rank() == 0:
        commit(cfg, ctx, s, t)
