"""train: check rows -> tokenized cache -> SFTTrainer (resumes from the work area) -> save -> card -> load and generate.

Every rank of a multi-GPU run executes this function; tokenization happens on the main process first
(the others then read the cache), and only the main process writes the output and the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from importlib import resources
from typing import Any

import torch

from hala.contract import artifact, tables
from hala.contract.errors import ConfigError, DataError
from hala.contract.hashing import sha256_json
from hala.contract.step import StepContext, rank
from hala.contract.store import Identity, describe_local, new_manifest, now, output_entry
from stages.train import checkpoints, data
from stages.train.config import TrainConfig

CACHE_RUN = "_cache"  # <store>/_cache/tokenized-<key>/: shared by every run and step of the store
CURVE_POINTS = 200  # the manifest keeps at most this many loss points; training_log.jsonl keeps all


def load_tokenizer(path: str, cfg: TrainConfig, ctx: StepContext) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    pad = cfg.trainer.get("pad_token")
    if pad is not None and pad not in tok.get_vocab():
        raise ConfigError(f"step '{ctx.step.name}': trainer.pad_token {pad!r} is not in the tokenizer's vocabulary")
    if pad is None and tok.pad_token is None:
        raise ConfigError(
            f"step '{ctx.step.name}': the tokenizer of {ctx.input('model').ref.raw} has no pad token. Set trainer.pad_token "
            f"to a token of its vocabulary that is not trained on, e.g. its eos token {tok.eos_token!r} (batches are "
            "padded with it and the padding is masked from the loss)"
        )
    if pad is not None:
        tok.pad_token = pad
    return tok


def named_template(name: str, ctx: StepContext) -> str:
    shipped = resources.files("trl") / "chat_templates" / f"{name}.jinja"
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    path = (ctx.recipe.path.parent / name).resolve()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    names = sorted(p.name[:-6] for p in (resources.files("trl") / "chat_templates").iterdir() if p.name.endswith("_training.jinja"))
    raise ConfigError(f"step '{ctx.step.name}': chat_template {name!r} is neither a template TRL ships nor a file next to "
                      f"the recipe ({path}); TRL's training templates: {', '.join(names)}")


def training_template(tok: Any, cfg: TrainConfig, ctx: StepContext) -> tuple[str, str]:
    """The template to tokenize with, and where it came from. Conversations need `{% generation %}` markers."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if cfg.chat_template:
        template, source = named_template(cfg.chat_template, ctx), cfg.chat_template
    elif tok.chat_template:
        template, source = tok.chat_template, "model"
    else:
        raise ConfigError(f"step '{ctx.step.name}': {ctx.input('model').ref.raw} has no chat template; name one with "
                          "chat_template (a TRL template such as lfm2_training, or a .jinja file)")
    if cfg.task == "conversations" and not has_generation_markers(template):
        if cfg.chat_template:
            raise ConfigError(f"step '{ctx.step.name}': chat_template {cfg.chat_template!r} has no {{% generation %}} markers, "
                              "which assistant-only loss needs; use a *_training template")
        try:
            patched = get_training_chat_template(tok)
        except ValueError as e:
            raise ConfigError(f"step '{ctx.step.name}': the chat template of {ctx.input('model').ref.raw} has no "
                              f"{{% generation %}} markers and TRL cannot patch it ({e}). Set chat_template to a training "
                              "template with the same format (a TRL *_training name or a .jinja file)") from None
        if patched:
            template, source = patched, "model, patched by TRL for training"
    return template, source


def tokenizer_fingerprint(tok: Any, template: str) -> str:
    backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok.get_vocab())
    return sha256_json({"tokenizer": backend, "template": template, "special": tok.special_tokens_map, "pad": tok.pad_token})


def read_examples(cfg: TrainConfig, ctx: StepContext) -> data.Examples:
    names = [n for n in ctx.inputs if n != "model"]
    out = data.Examples()
    for name in names:
        path = ctx.input(name).local_path()  # every file checked against its manifest (and local: read it twice)
        reader = tables.RowGroups.local(path)
        columns = reader.columns
        kind = data.kind_of(columns)
        if kind != cfg.task:
            raise DataError(f"step '{ctx.step.name}': input '{name}' ({ctx.input(name).ref.raw}) holds "
                            f"{kind or 'neither pairs nor conversations'} (columns {', '.join(columns) or 'none'}), task is {cfg.task}")
        out.rows_in[name] = reader.total
        rows = (row for _, row in reader.rows(0, reader.total))  # a batch of rows at a time, never the whole input
        if kind == "pairs":
            data.add_pairs(out, name, rows, cfg)
        else:
            data.add_conversations(out, name, rows)
    return out


def cache_key(cfg: TrainConfig, ctx: StepContext, tok_fp: str, sft: dict[str, Any]) -> str:
    """Everything the tokenized data depends on, and nothing about the model's weights or the optimizer."""
    import trl

    here = os.path.dirname(__file__)
    with open(os.path.join(here, "data.py"), "rb") as f:
        code = f.read().decode()
    return sha256_json({
        "inputs": {n: r.key for n, r in ctx.inputs.items() if n != "model"},
        "config": cfg.model_dump(include={"task", "prompt", "directions", "span_markers", "mixture", "too_long", "eval_fraction", "seed"}),
        "tokenizer": tok_fp,
        "sft": {k: sft.get(k) for k in ("max_length", "packing", "packing_strategy", "truncation_mode", "shuffle_dataset")},
        "trl": trl.__version__, "code": code,
    })


def tokenized(cfg: TrainConfig, ctx: StepContext, tok: Any, template: str, sft: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Local folder of the tokenized cache (train/, eval/, quarantine.parquet, stats.json), built if missing: a
    content-addressed artifact of the store (hala.contract.artifact), so two steps or pods with one cache key build it once."""
    from accelerate import PartialState

    key = cache_key(cfg, ctx, tokenizer_fingerprint(tok, template), sft)
    name = f"tokenized-{key[:20]}"

    def build(folder: str) -> dict[str, Any]:
        t0 = time.monotonic()
        examples = read_examples(cfg, ctx)
        try:
            prepared = data.prepare(examples, tok, template, cfg, sft.get("max_length"), sft.get("truncation_mode", "keep_start"),
                                    bool(sft.get("packing")), sft.get("packing_strategy", "bfd"), cfg.tokenize_workers,
                                    bool(sft.get("shuffle_dataset")))
            return cache_manifest(ctx, folder, name, key, prepared, time.monotonic() - t0)
        finally:
            shutil.rmtree(examples.folder, ignore_errors=True)  # the examples and datasets' map caches

    with PartialState().main_process_first():  # rank 0 builds; the others wait, then read what it committed
        manifest, hit = artifact.ensure(ctx.store, CACHE_RUN, name, key, build, ctx.log)
        path = ctx.store.localize(CACHE_RUN, name, manifest, "data")
    ctx.log.info("tokenized data", cache=name, hit=hit, **{k: manifest["metrics"][k] for k in ("sequences_train", "tokens_train")})
    return path, {"cache": f"{CACHE_RUN}/{name}", "hit": hit, **manifest["metrics"]}


def cache_manifest(ctx: StepContext, folder: str, name: str, key: str, prepared: data.Prepared, seconds: float) -> dict[str, Any]:
    """The tokenized data under folder/data, and its manifest."""
    import pyarrow as pa

    started = now()
    out = os.path.join(folder, "data")
    prepared.train.save_to_disk(os.path.join(out, "train"))
    if prepared.eval is not None:
        prepared.eval.save_to_disk(os.path.join(out, "eval"))
    tables.write(os.path.join(out, "quarantine.parquet"), prepared.quarantine, tables.quarantine_schema())
    stats = {**prepared.stats, "seconds": round(seconds, 3)}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    files = describe_local(folder, "data")
    return new_manifest(
        run=CACHE_RUN, step=Identity(name, "train.tokenize", ctx.step.spec.version if ctx.step.spec else None, {"made_by": ctx.step.name}, key),
        fingerprint=key, inputs={n: r.record() for n, r in ctx.inputs.items() if n != "model"},
        outputs={"data": output_entry(files, "data", "dataset", stats["sequences_train"], format="arrow", pyarrow=pa.__version__)},
        counts=None, quarantine={"rows": len(prepared.quarantine), "by_reason": stats["quarantine_by_reason"]},
        metrics=stats, timings={"started": started, "finished": now(), "seconds": round(seconds, 3)}, shards=None,
    )


def sft_kwargs(cfg: TrainConfig, output_dir: str, has_eval: bool) -> dict[str, Any]:
    """SFTConfig arguments: our defaults, the recipe's trainer block over them, then what the stage owns."""
    cuda = torch.cuda.is_available()
    defaults: dict[str, Any] = {
        "logging_steps": 10, "save_strategy": "steps", "save_steps": 500, "save_total_limit": 2, "report_to": "none",
        "seed": cfg.seed, "data_seed": cfg.seed, "disable_tqdm": True, "include_num_input_tokens_seen": "non_padding",
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),  # CPU: fp32, bit-stable
        "use_liger_kernel": bool(cuda and _liger_installed()),
        "model_init_kwargs": {"dtype": cfg.load_dtype},
    }
    if has_eval:
        defaults["eval_strategy"] = "steps"
    kwargs = {**defaults, **cfg.trainer}
    if cfg.trainer.get("model_init_kwargs"):
        kwargs["model_init_kwargs"] = {"dtype": cfg.load_dtype, **cfg.trainer["model_init_kwargs"]}
    kwargs.update(output_dir=output_dir, dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=not cuda)
    return kwargs


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def make_sft_config(kwargs: dict[str, Any], ctx: StepContext) -> Any:
    from trl import SFTConfig

    if kwargs.get("use_liger_kernel") and not _liger_installed():
        raise ConfigError(f"step '{ctx.step.name}': trainer.use_liger_kernel is true but liger-kernel is not installed "
                          "(the GPU image has it; on CPU leave it unset)")
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"step '{ctx.step.name}': trainer: {e}") from None


def lora_config(cfg: TrainConfig) -> Any:
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


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
    train = [{"step": h["step"], "loss": h["loss"], **({"learning_rate": h["learning_rate"]} if "learning_rate" in h else {}),
              **({"grad_norm": h["grad_norm"]} if "grad_norm" in h else {})} for h in history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]

    def thin(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(points) <= CURVE_POINTS:
            return points
        every = len(points) / CURVE_POINTS
        return [points[int(i * every)] for i in range(CURVE_POINTS - 1)] + [points[-1]]

    return {"train": thin(train), "eval": thin(evals)}


def finalize(saved: str, out: str, base: str, tok: Any, cfg: TrainConfig) -> None:
    """The committed folder: LoRA merged, weights in save_dtype, the base's inference template and generation config."""
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
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    new = gen[0, enc["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(new.numel())


def model_card(ctx: StepContext, cfg: TrainConfig, name: str, hyper: dict[str, Any], prep: dict[str, Any],
               result: dict[str, Any]) -> str:
    base = ctx.input("model")
    rows = "\n".join(f"| {n} | `{r.ref.raw}` | {r.record().get('rows')} | {(cfg.mixture or {}).get(n, 1.0)} | `{r.key[:16]}` |"
                     for n, r in ctx.inputs.items() if n != "model")
    shown = {k: hyper[k] for k in sorted(hyper) if k in {*cfg.trainer, "learning_rate", "num_train_epochs", "max_steps",
             "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing", "lr_scheduler_type",
             "warmup_ratio", "bf16", "seed"}}
    return (
        "---\n"
        f"base_model: {base.ref.uri if base.kind == 'hub' else base.ref.raw}\n"
        "language: [ar, en]\ntags: [hala, sft, trl" + (", lora" if cfg.lora else "") + "]\n"
        "---\n\n"
        f"# {name}\n\n"
        f"Supervised fine-tuning of `{base.ref.raw}` by the Hala pipeline's train stage (run `{ctx.run}`, step "
        f"`{ctx.step.name}`), with TRL's SFTTrainer: task `{cfg.task}`, loss on "
        f"{'the completion (translation)' if cfg.task == 'pairs' else 'assistant turns only'}"
        + (f", LoRA r={cfg.lora.r} merged into the base" if cfg.lora else ", all weights") + ".\n\n"
        "## Data\n\n| input | source | rows | weight | sha256 |\n| --- | --- | --- | --- | --- |\n" + rows + "\n\n"
        f"Rows used {prep['rows_used']}, quarantined {sum(prep['quarantine_by_reason'].values())} "
        f"({', '.join(f'{k} {v}' for k, v in prep['quarantine_by_reason'].items()) or 'none'}), "
        f"{prep['sequences_train']} training sequences, {prep['tokens_train']} tokens.\n\n"
        "## Hyperparameters\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in shown.items()) + "\n\n"
        "## Result\n\n"
        f"- global steps: {result['global_step']}; final training loss {result['final_loss']}"
        + (f"; eval loss {result['eval_loss']}" if result.get("eval_loss") is not None else "") + "\n"
        "- the loss curve is in `training_log.jsonl` and in the step's manifest\n"
    )


def main(cfg: TrainConfig, ctx: StepContext) -> None:
    from transformers import PrinterCallback
    from trl import SFTTrainer

    base = ctx.model_path("model")
    tok = load_tokenizer(base, cfg, ctx)
    template, template_source = training_template(tok, cfg, ctx)
    area = checkpoints.Area(ctx.store, ctx.work)
    # SFTConfig's effective values (its defaults too: max_length is 1024 unless set) shape the tokenized data
    probe = make_sft_config(sft_kwargs(cfg, area.dir, has_eval=False), ctx)
    folder, prep = tokenized(cfg, ctx, tok, template, {k: getattr(probe, k) for k in
                                                       ("max_length", "packing", "packing_strategy", "truncation_mode", "shuffle_dataset")})
    from datasets import load_from_disk

    train_ds = load_from_disk(os.path.join(folder, "train"))
    eval_ds = load_from_disk(os.path.join(folder, "eval")) if os.path.isdir(os.path.join(folder, "eval")) else None
    if len(train_ds) == 0:
        raise DataError(f"step '{ctx.step.name}': no row is left to train on; the quarantine has "
                        f"{prep['quarantine_by_reason']} (see {prep['cache']}/data/quarantine.parquet)")
    args = make_sft_config(sft_kwargs(cfg, area.dir, has_eval=eval_ds is not None), ctx)
    resume = area.latest()
    trainer = SFTTrainer(model=base, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                         peft_config=lora_config(cfg))
    trainer.model.config.use_cache = False
    trainer.remove_callback(PrinterCallback)  # the Report callback logs the same dicts as structured events
    with ctx.progress(args.max_steps if args.max_steps > 0 else None, unit="steps", what="train") as progress:
        trainer.add_callback(checkpoints.Mark(area, ctx.log, ctx.check_lease))
        trainer.add_callback(checkpoints.Report(progress, ctx.log))
        if resume:
            ctx.log.info("resuming", checkpoint=resume[0], global_step=resume[1])
        t0 = time.monotonic()
        out = trainer.train(resume_from_checkpoint=resume[0] if resume else None)
        train_seconds = time.monotonic() - t0
    state = trainer.state
    report = next(c for c in trainer.callback_handler.callbacks if isinstance(c, checkpoints.Report))
    tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0) - report.tokens_at_start  # this process's share
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ds is not None else None
    saved = os.path.join(area.dir if ctx.store.is_local else tempfile.mkdtemp(prefix="hala-train-final-"), "final")
    trainer.save_model(saved)  # every rank: FSDP gathers the full state dict here
    if rank() != 0:
        return
    name = output_name(cfg, ctx)
    folder_out = ctx.output_dir("model", folder=name)
    tok.chat_template = tok.chat_template or template  # inference template: the model's own when it had one
    finalize(saved, folder_out, base, tok, cfg)
    history = state.log_history
    with open(os.path.join(folder_out, "training_log.jsonl"), "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    losses = [h["loss"] for h in history if "loss" in h]
    result = {"global_step": state.global_step, "final_loss": losses[-1] if losses else None,
              "first_loss": losses[0] if losses else None, "train_loss": out.training_loss, "eval_loss": eval_loss}
    hyper = args.to_dict()
    with open(os.path.join(folder_out, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(ctx, cfg, name, hyper, prep, result))
    prompt = sample_prompt(cfg)
    answer, new_tokens = generate(folder_out, prompt)
    shutil.rmtree(saved, ignore_errors=True)

    import pyarrow.parquet as pq

    q_rows = pq.read_table(os.path.join(folder, "quarantine.parquet")).to_pylist()
    tables.write(os.path.join(ctx.output_dir("quarantine"), "quarantine.parquet"), q_rows, tables.quarantine_schema())
    for row in q_rows:
        ctx.quarantine(row["reason"])
    rows_in = sum(prep["rows_in"].values())
    removed = {"mixture_sampled_out": prep["rows_sampled_out"]} if prep["rows_sampled_out"] else {}
    ctx.count(rows_in=rows_in, rows_out=prep["rows_used"], rows_quarantined=len(q_rows), rows_removed=removed)
    ctx.set_output("quarantine", rows=len(q_rows), format="parquet", schema="quarantine")
    ctx.set_output("model", rows=None, format="safetensors", model_name=name, task=cfg.task)
    ctx.timings["train_seconds"] = round(train_seconds, 3)
    ctx.metrics.update(
        name=name, base=ctx.input("model").record(), task=cfg.task, chat_template=template_source,
        lora=cfg.lora.model_dump() if cfg.lora else None, resumed_from_step=resume[1] if resume else None,
        tokenized=prep, trainer={k: hyper[k] for k in sorted(hyper) if k in cfg.trainer or k in {"learning_rate", "max_steps",
                                 "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                                 "packing", "bf16", "seed", "lr_scheduler_type", "save_steps"}},
        world_size=args.world_size, device=str(args.device), **result,
        tokens_trained=tokens_seen, train_tokens_per_second=round(tokens_seen / max(train_seconds, 1e-9), 1),
        loss_curve=curve(history), sample={"prompt": prompt, "output": answer, "new_tokens": new_tokens},
    )
    if new_tokens == 0:
        raise DataError(f"step '{ctx.step.name}': the trained model {name} generated no token for the sample prompt {prompt!r}")
    if not answer.strip():  # loads and runs, but stops at once: worth a look, not a broken checkpoint
        ctx.log.warning("the trained model answered the sample prompt with only special tokens", prompt=prompt, new_tokens=new_tokens)
