"""quantize: load -> llm-compressor oneshot -> save compressed -> fidelity check -> sample generation.

Nothing is committed unless the saved checkpoint reloads, stays within the recipe's perplexity
tolerance of its source (exit 3 otherwise), and generates.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import time
from typing import Any

import pyarrow.parquet as pq
import torch

from hala.contract.errors import ConfigError, DataError
from hala.contract.step import StepContext
from stages.quantize import fidelity
from stages.quantize.config import QuantizeConfig, needs_calibration

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def lineage_name(ctx: StepContext, cfg: QuantizeConfig) -> str:
    """<model>-<scheme>: FP8_DYNAMIC -> FP8-Dynamic, as llm-compressor's examples name their outputs."""
    if cfg.name:
        return cfg.name
    ref = ctx.input("model")
    if ref.kind == "hub":
        base = ref.uri.rsplit("/", 1)[-1]
    elif ref.kind == "tiny":
        base = f"tiny-{ref.ref.uri}"
    elif ref.kind == "step":
        base = ref.folder_name or ref.ref.step or "model"
    else:
        base = os.path.basename(ref.uri.rstrip("/"))
    head, *rest = cfg.scheme.split("_")
    return "-".join([base, head, *(part.title() for part in rest)])


def device_info() -> dict[str, Any]:
    """Where this ran, and whether the GPU computes FP8 natively (compute capability >= 8.9)."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "capability": f"{major}.{minor}",
            "fp8_native": (major, minor) >= (8, 9),
        }
    return {
        "type": "cpu",
        "fp8_native": False,
        "note": "FP8 is emulated on CPU: numbers are about fidelity, not speed",
    }


def read_chats(path: str, cfg: QuantizeConfig, limit: int) -> list[list[dict[str, str]]]:
    """Chats from a prepared dataset: pairs become prompt -> reference translation; conversations stay as they
    are."""
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        raise DataError(
            f"{path}: no parquet files; the sample input should be a prepare (or translate) step output"
        )
    chats: list[list[dict[str, str]]] = []
    for f in files:
        for row in pq.read_table(f).to_pylist():
            if "src" in row and "tgt" in row:
                chats.append(
                    [
                        {"role": "user", "content": cfg.prompt.format(text=row["src"])},
                        {"role": "assistant", "content": row["tgt"]},
                    ]
                )
            elif "messages" in row:
                msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"] if m["content"]]
                if msgs and msgs[-1]["role"] == "assistant":
                    chats.append(msgs)
            else:
                raise DataError(f"{f}: rows have neither src/tgt (pairs) nor messages (conversations)")
            if len(chats) >= limit:
                return chats
    return chats


def _size(path: str) -> int | None:
    if not os.path.isdir(path):
        return None  # a hub id: the download lives in the Hugging Face cache
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "*.safetensors")))


def quantized_modules(model: Any) -> tuple[list[str], dict[str, list[str]]]:
    """Which modules carry a quantization scheme, and which weight-bearing modules do not (and why that
    matters: LFM2's depthwise conv is an nn.Conv1d, not a Linear, so FP8_DYNAMIC leaves it in bf16)."""
    done = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    kept: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if n in done or not list(m.parameters(recurse=False)):
            continue
        kept.setdefault(type(m).__name__, []).append(n)
    return done, kept


def save_checkpoint(model: Any, tok: Any, out: str) -> None:
    """compressed-tensors weights, config with quantization_config, recipe.yaml, tokenizer and chat
    template."""
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)


def main(cfg: QuantizeConfig, ctx: StepContext) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calibration = None
    if needs_calibration(cfg):  # with an input 'calibration': the config's check_inputs
        calibration = read_chats(ctx.input("calibration").local_path(), cfg, cfg.calibration_rows)
    src = ctx.model_path("model")
    device = device_info()
    ctx.metrics["device"] = device
    load = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if cfg.device_map:
        load["device_map"] = cfg.device_map
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(src, **load)

    # --- quantize ---------------------------------------------------------------------------------
    modifier_cls = GPTQModifier if cfg.algorithm == "gptq" else QuantizationModifier
    recipe = modifier_cls(targets=cfg.targets, scheme=cfg.scheme, ignore=cfg.ignore)
    kwargs: dict[str, Any] = {}
    if calibration is not None:
        from datasets import Dataset

        texts = [tok.apply_chat_template(c, tokenize=False) for c in calibration]
        ds = Dataset.from_dict({"text": texts}).map(
            lambda b: tok(
                b["text"], truncation=True, max_length=cfg.max_seq_length, add_special_tokens=False
            ),
            batched=True,
            remove_columns=["text"],
        )
        kwargs = dict(dataset=ds, max_seq_length=cfg.max_seq_length, num_calibration_samples=len(texts))
    t0 = time.monotonic()
    model = oneshot(model=model, recipe=recipe, **kwargs)
    ctx.timings["oneshot_seconds"] = round(time.monotonic() - t0, 3)
    done, kept = quantized_modules(model)
    if not done:
        raise ConfigError(
            f"step '{ctx.step.name}': no module matched targets {cfg.targets} (ignore {cfg.ignore})"
        )

    # --- save, named after its lineage --------------------------------------------------------------
    name = lineage_name(ctx, cfg)
    out = ctx.output_dir("model", folder=name)
    t0 = time.monotonic()
    save_checkpoint(model, tok, out)
    ctx.timings["save_seconds"] = round(time.monotonic() - t0, 3)
    del model
    gc.collect()
    qconfig = json.load(open(os.path.join(out, "config.json")))["quantization_config"]

    # --- fidelity: measured on the saved checkpoint --------------------------------------------------
    chats = read_chats(ctx.input("sample").local_path(), cfg, cfg.fidelity_rows)
    items = fidelity.encode(tok, chats, cfg.max_seq_length)
    quantized_holder: dict[str, Any] = {}

    def load_source() -> Any:
        return AutoModelForCausalLM.from_pretrained(src, **load).eval()

    def load_quantized() -> Any:
        m = AutoModelForCausalLM.from_pretrained(
            out,
            trust_remote_code=cfg.trust_remote_code,
            **({"device_map": cfg.device_map} if cfg.device_map else {}),
        ).eval()
        quantized_holder["model"] = m
        return m

    t0 = time.monotonic()
    report = fidelity.compare(load_source, load_quantized, items, cfg.fidelity_mode)
    ctx.timings["fidelity_seconds"] = round(time.monotonic() - t0, 3)
    report["max_ppl_increase"] = cfg.max_ppl_increase
    ctx.metrics["fidelity"] = report
    ctx.log.info("fidelity", **report)
    problem = fidelity.verdict(report, cfg.max_ppl_increase, cfg.min_argmax_agreement)
    if problem:
        raise DataError(
            f"step '{ctx.step.name}': the {cfg.scheme} checkpoint fails its fidelity check: {problem}; "
            "nothing was committed (ignore more modules, pick another scheme, or raise the tolerance)"
        )

    # --- the saved checkpoint generates ------------------------------------------------------------
    model = quantized_holder.get("model") or load_quantized()
    prompt = tok.apply_chat_template(
        chats[0][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        gen = model.generate(
            **prompt.to(model.device),
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    sample = tok.decode(gen[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    quantized_holder.clear()
    del model
    gc.collect()

    size_in, size_out = _size(src), _size(out)
    ctx.metrics.update(
        scheme=cfg.scheme,
        algorithm=cfg.algorithm,
        name=name,
        quantization_format=qconfig.get("format"),
        quantized_modules=len(done),
        quantized=done,
        not_quantized=kept,
        source_bytes=size_in,
        output_bytes=size_out,
        size_ratio=round(size_out / size_in, 4) if size_in and size_out else None,
        sample={"prompt": chats[0][0]["content"], "output": sample},
    )
    ctx.set_output(
        "model",
        format="compressed-tensors",
        quantization=qconfig.get("format"),
        scheme=cfg.scheme,
        model_name=name,
    )
