"""train, setup: the tokenizer and its training template, and the SFTConfig and LoRA config the run uses.

Everything here is decided before a row is read, so a bad trainer block or a model without a usable chat
template fails in seconds, not after tokenization.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from typing import Any

import torch

from hala.contract.errors import ConfigError
from hala.contract.hashing import sha256_json
from hala.contract.step import StepContext
from stages.train.config import TrainConfig


def load_tokenizer(path: str, cfg: TrainConfig, ctx: StepContext) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    pad = cfg.trainer.get("pad_token")
    if pad is not None and pad not in tok.get_vocab():
        raise ConfigError(
            f"step '{ctx.step.name}': trainer.pad_token {pad!r} is not in the tokenizer's vocabulary"
        )
    if pad is None and tok.pad_token is None:
        raise ConfigError(
            f"step '{ctx.step.name}': the tokenizer of {ctx.input('model').ref.raw} has no pad token. Set "
            "trainer.pad_token "
            f"to a token of its vocabulary that is not trained on, e.g. its eos token {tok.eos_token!r} "
            "(batches are "
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
    names = sorted(
        p.name[:-6]
        for p in (resources.files("trl") / "chat_templates").iterdir()
        if p.name.endswith("_training.jinja")
    )
    raise ConfigError(
        f"step '{ctx.step.name}': chat_template {name!r} is neither a template TRL ships nor a file next to "
        f"the recipe ({path}); TRL's training templates: {', '.join(names)}"
    )


def training_template(tok: Any, cfg: TrainConfig, ctx: StepContext) -> tuple[str, str]:
    """The template to tokenize with, and where it came from. Conversations need `{% generation %}`
    markers."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if cfg.chat_template:
        template, source = named_template(cfg.chat_template, ctx), cfg.chat_template
    elif tok.chat_template:
        template, source = tok.chat_template, "model"
    else:
        raise ConfigError(
            f"step '{ctx.step.name}': {ctx.input('model').ref.raw} has no chat template; name one with "
            "chat_template (a TRL template such as lfm2_training, or a .jinja file)"
        )
    if cfg.task == "conversations" and not has_generation_markers(template):
        if cfg.chat_template:
            raise ConfigError(
                f"step '{ctx.step.name}': chat_template {cfg.chat_template!r} has no {{% generation %}} "
                "markers, "
                "which assistant-only loss needs; use a *_training template"
            )
        try:
            patched = get_training_chat_template(tok)
        except ValueError as e:
            raise ConfigError(
                f"step '{ctx.step.name}': the chat template of {ctx.input('model').ref.raw} has no "
                f"{{% generation %}} markers and TRL cannot patch it ({e}). Set chat_template to a training "
                "template with the same format (a TRL *_training name or a .jinja file)"
            ) from None
        if patched:
            template, source = patched, "model, patched by TRL for training"
    return template, source


def tokenizer_fingerprint(tok: Any, template: str) -> str:
    backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok.get_vocab())
    return sha256_json(
        {"tokenizer": backend, "template": template, "special": tok.special_tokens_map, "pad": tok.pad_token}
    )


def sft_kwargs(cfg: TrainConfig, output_dir: str, has_eval: bool) -> dict[str, Any]:
    """SFTConfig arguments: our defaults, the recipe's trainer block over them, then what the stage owns."""
    cuda = torch.cuda.is_available()
    defaults: dict[str, Any] = {
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "report_to": "none",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
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
    return importlib.util.find_spec("liger_kernel") is not None


def make_sft_config(kwargs: dict[str, Any], ctx: StepContext) -> Any:
    from trl import SFTConfig

    if kwargs.get("use_liger_kernel") and not _liger_installed():
        raise ConfigError(
            f"step '{ctx.step.name}': trainer.use_liger_kernel is true but liger-kernel is not installed "
            "(the GPU image has it; on CPU leave it unset)"
        )
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"step '{ctx.step.name}': trainer: {e}") from None


def lora_config(cfg: TrainConfig) -> Any:
    if cfg.lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
