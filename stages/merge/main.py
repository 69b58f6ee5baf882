"""merge: check the two checkpoints agree -> merge tensor by tensor, streamed -> card -> load and generate.

slerp follows MergeKit: inputs cast to `dtype`; each tensor is treated as one vector, in float32; both are
normalised, and when they are nearly colinear (|cos| > 0.9995) slerp falls back to linear interpolation;
the result is stored in `dtype`, then written in `out_dtype`. Nothing holds a whole model: each tensor is
read in row chunks (two passes for slerp: norms and dot product, then the result; one read when the tensor
fits in a chunk; within a chunk, cache-sized blocks are converted to float32 and computed), and results go
straight to disk. The load-and-generate check runs in a process of its own (`check.py`), started with the
stage so that its imports overlap the merge.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time

import torch

from hala.contract.errors import DataError
from hala.contract.step import StepContext
from stages.merge import schedule
from stages.merge.check import Checker
from stages.merge.config import MergeConfig
from stages.merge.tensors import TORCH_DTYPES, Checkpoint, StreamWriter, chunk_rows

DOT_THRESHOLD = 0.9995  # MergeKit's: above it the two directions are treated as colinear
EPS = 1e-8
BLOCK = 1 << 18  # elements per side converted to float32 at once: 2 MiB for the pair, within the CPU's cache
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SKIP_FILES = {
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "README.md",
    "recipe.yaml",
    "training_args.bin",
}


def local_model(ctx: StepContext, name: str) -> str:
    """A local folder for a model input; a hub repository is downloaded (safetensors, configs, tokenizer
    only)."""
    resolved = ctx.input(name)
    if resolved.kind == "hub":
        from huggingface_hub import snapshot_download

        # the pinned commit (hala.contract.sources.hub_revision), without the duplicate .bin weights some
        # repositories carry
        path = snapshot_download(
            resolved.uri,
            revision=resolved.revision,
            allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"],
        )
    else:
        path = ctx.model_path(name)
    if not os.path.isdir(path):
        raise DataError(f"input '{name}': {path} is not a model folder")
    return path


def check_compatible(base: Checkpoint, model: Checkpoint) -> None:
    """Same architecture, same tensors, same shapes: otherwise exit 3 naming what differs."""
    arch_b, arch_m = base.config.get("architectures"), model.config.get("architectures")
    if arch_b != arch_m:
        raise DataError(
            f"architectures differ: base {arch_b}, model {arch_m}; slerp needs two checkpoints of one "
            "architecture"
        )
    only_b = sorted(set(base.tensors) - set(model.tensors))
    only_m = sorted(set(model.tensors) - set(base.tensors))
    if only_b or only_m:
        hint = (
            " (one of them ties its embeddings to lm_head, the other does not)"
            if "lm_head.weight" in only_b + only_m
            else ""
        )
        raise DataError(
            f"tensor sets differ{hint}: only in base {only_b[:5]}{' …' if len(only_b) > 5 else ''}, "
            f"only in model {only_m[:5]}{' …' if len(only_m) > 5 else ''}"
        )
    for name, tb in base.tensors.items():
        tm = model.tensors[name]
        if tb.shape != tm.shape:
            vocab = (
                " (different vocabularies: merge only models that share a tokenizer)"
                if "embed" in name or "lm_head" in name
                else ""
            )
            raise DataError(
                f"tensor {name}: shape {list(tb.shape)} in base, {list(tm.shape)} in model{vocab}"
            )


def _float(dtype_name: str) -> bool:
    return dtype_name.startswith(("F", "BF"))


def _blocks(a: torch.Tensor, b: torch.Tensor, bufs: tuple[torch.Tensor, torch.Tensor]):
    """(slice, a, b) per block of the two flattened chunks, converted into the float buffers.

    Converting a whole chunk to float32 and running each operation over it streams every value through
    memory a dozen times; a block of BLOCK elements per side stays in the CPU's cache for all of them."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    n = flat_a.numel()
    for u in range(0, n, BLOCK):
        k = min(BLOCK, n - u)
        yield slice(u, u + k), bufs[0][:k].copy_(flat_a[u : u + k]), bufs[1][:k].copy_(flat_b[u : u + k])


def merge_tensor(
    name: str,
    base: Checkpoint,
    model: Checkpoint,
    weights: tuple[float, float],
    method: str,
    dtype: torch.dtype,
    writer: StreamWriter,
    bufs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]],
) -> str:
    """Merge one tensor into the writer; returns how: slerp, lerp (slerp's colinear fallback), linear,
    copied."""
    info = base.tensors[name]
    rows = info.shape[0] if info.shape else 1
    step = chunk_rows(info.shape)
    writer.begin(name)
    if not _float(info.dtype):
        for s in range(0, rows, step):
            writer.write(base.rows(name, s, s + step))
        return "copied"
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if math_dtype not in bufs:
        bufs[math_dtype] = (torch.empty(BLOCK, dtype=math_dtype), torch.empty(BLOCK, dtype=math_dtype))
    buf = bufs[math_dtype]
    whole = rows <= step  # most tensors fit in one chunk: read them once, not once per pass
    cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        if s in cached:
            return cached[s]
        # MergeKit casts the inputs to dtype, then computes in float32
        a = base.rows(name, s, s + step).to(dtype)
        b = model.rows(name, s, s + step).to(dtype)
        if whole:
            cached[s] = (a, b)
        return a, b

    if method == "linear":
        # sum of w * x, then / sum of w; the second product is fused with the sum (addcmul), which keeps
        # results that cancel to ~0 within one bf16 ulp of MergeKit's (it computes this in dtype)
        wb, wm = (torch.tensor(w, dtype=math_dtype) for w in weights)
        for s in range(0, rows, step):
            a16, b16 = pair(s)
            out = torch.empty_like(a16)
            flat = out.reshape(-1)
            for where, a, b in _blocks(a16, b16, buf):
                flat[where] = a.mul_(wb).addcmul_(b, wm).div_(wb + wm)
            writer.write(out)
        return "linear"
    t = weights[1] / (weights[0] + weights[1])
    # slerp over the whole tensor as one vector. One pass gathers both norms and the dot product (MergeKit's
    # dot of the normalised vectors equals the raw dot over the product of the norms); a second writes the
    # result. Block sums are added in float64, so the order of the blocks does not matter.
    sq_a = sq_b = raw_dot = 0.0
    for s in range(0, rows, step):
        a16, b16 = pair(s)
        for _, a, b in _blocks(a16, b16, buf):
            sq_a += float(torch.dot(a, a))
            sq_b += float(torch.dot(b, b))
            raw_dot += float(torch.dot(a, b))
    norm_a, norm_b = math.sqrt(sq_a), math.sqrt(sq_b)
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = min(1.0, max(-1.0, raw_dot / norm_a / norm_b))
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b, how = 1 - t, t, "lerp"
    else:
        theta = math.acos(dot)
        coef_a = math.sin((1 - t) * theta) / math.sin(theta)
        coef_b = math.sin(t * theta) / math.sin(theta)
        how = "slerp"
    for s in range(0, rows, step):
        a16, b16 = pair(s)
        out = torch.empty_like(a16)
        flat = out.reshape(-1)
        for where, a, b in _blocks(a16, b16, buf):
            # two products and a sum, rounded one by one as MergeKit's numpy does (a fused multiply-add moves
            # results that cancel to ~0), then rounded to dtype
            flat[where] = a.mul_(coef_a).add_(b.mul_(coef_b))
        writer.write(out)
        cached.pop(s, None)
    return how


def copy_side_files(src: str, out: str) -> list[str]:
    """Tokenizer, chat template, generation config: everything but weights, cards and the model config."""
    copied = []
    for fname in sorted(os.listdir(src)):
        path = os.path.join(src, fname)
        if (
            not os.path.isfile(path)
            or fname.endswith(WEIGHT_FILES)
            or fname in SKIP_FILES
            or fname == "config.json"
            or fname.startswith((".", "_"))
        ):
            continue
        shutil.copy2(path, os.path.join(out, fname))
        copied.append(fname)
    return copied


def write_config(base: Checkpoint, out: str, out_dtype: str) -> None:
    """The base's architecture config, with the dtype the weights are written in."""
    cfg = dict(base.config)
    cfg["dtype"] = out_dtype
    cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def model_card(ctx: StepContext, plan: schedule.Plan, name: str, counts: dict[str, int]) -> str:
    base, model = ctx.input("base"), ctx.input("model")
    t_text = json.dumps(plan.weights if plan.weights else plan.t_setting)
    return (
        "---\n"
        f"base_model: {base.ref.uri if base.kind == 'hub' else base.ref.raw}\n"
        "tags: [merge, " + plan.method + ", hala]\n"
        "---\n\n"
        f"# {name}\n\n"
        f"A {plan.method} merge of a fine-tuned model with its base, made by the Hala pipeline's merge stage "
        f"(run `{ctx.run}`, step `{ctx.step.name}`).\n\n"
        "| parent | role | source | sha256 |\n| --- | --- | --- | --- |\n"
        f"| base | t = 0 | `{base.ref.raw}` | `{base.key[:16]}` |\n"
        f"| model | t = 1 | `{model.ref.raw}` | `{model.key[:16]}` |\n\n"
        f"- method: {plan.method}; t: `{t_text}` ({plan.source}); merge dtype {plan.dtype}, written as "
        f"{plan.out_dtype}\n"
        f"- tensors: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}\n"
        f"- tokenizer and chat template from: {plan.tokenizer_source}\n"
    )


def output_name(ctx: StepContext, plan: schedule.Plan, cfg: MergeConfig) -> str:
    if cfg.name:
        return cfg.name
    ref = ctx.input("model")
    if ref.kind == "step":
        base = ref.folder_name or ref.ref.step or "model"
    elif ref.kind == "tiny":
        base = f"tiny-{ref.ref.uri}"
    else:
        base = os.path.basename(ref.uri.rstrip("/"))
    t = plan.t_setting if not plan.weights else None
    suffix = f"t{t:g}" if isinstance(t, (int, float)) else "schedule"
    return f"{base}-{plan.method}-{suffix}"


def main(cfg: MergeConfig, ctx: StepContext, checker: Checker | None = None) -> None:
    """`checker`: a check process started before the inputs were hashed (the stage's entrypoint does); one is
    started here otherwise."""
    if checker is None:
        with Checker() as checker:
            return main(cfg, ctx, checker)
    plan = schedule.from_config(cfg)
    base = Checkpoint(local_model(ctx, "base"))
    checker.prepare(base.folder)  # the check process imports this architecture's code while we merge
    model = Checkpoint(local_model(ctx, "model"))
    check_compatible(base, model)
    side = base.folder if plan.tokenizer_source == "base" else model.folder
    if not any(os.path.exists(os.path.join(side, f)) for f in TOKENIZER_FILES):
        raise DataError(
            f"input '{plan.tokenizer_source}' ({side}) has no tokenizer ({' or '.join(TOKENIZER_FILES)}): "
            "the merged "
            "model takes its tokenizer and chat template from there; add them, or set tokenizer_source to "
            "the other input"
        )
    layers = base.num_layers()
    if layers == 0:
        raise DataError(
            f"{base.folder}/config.json has no num_hidden_layers: cannot place tensors along the layers"
        )
    ts = {name: plan.t(name, layers) for name in base.tensors}
    name = output_name(ctx, plan, cfg)
    out = ctx.output_dir("model", folder=name)
    dtype, out_dtype = TORCH_DTYPES[plan.dtype], TORCH_DTYPES[plan.out_dtype]
    order = list(base.tensors)  # the base's file order keeps reads sequential
    writer = StreamWriter(
        out,
        [
            (
                n,
                base.tensors[n].shape,
                out_dtype if _float(base.tensors[n].dtype) else _torch(base.tensors[n].dtype),
            )
            for n in order
        ],
        cfg.max_shard_size,
    )
    counts: dict[str, int] = {}
    bufs: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
    threads = torch.get_num_threads()
    # the writer thread (file writes, sha256) needs a core of its own: torch's threads spin-wait when one of
    # their cores is taken (on 2 cores the merge loop took ~1.4x as long)
    torch.set_num_threads(max(1, threads - 1))
    t0 = time.monotonic()
    try:
        with ctx.progress(len(order), unit="tensors", what="merge") as progress:
            for n in order:
                how = merge_tensor(n, base, model, ts[n], plan.method, dtype, writer, bufs)
                counts[how] = counts.get(how, 0) + 1
                progress.update()
        written = writer.close()
    finally:
        torch.set_num_threads(threads)
    for path, (sha256, size) in writer.digests.items():
        ctx.known_digest(path, sha256, size)  # hashed as written: the commit does not read them again
    ctx.timings["merge_seconds"] = round(time.monotonic() - t0, 3)
    copied = copy_side_files(side, out)
    write_config(base, out, plan.out_dtype)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(ctx, plan, name, counts))
    answer = checker.check(out, cfg.sample_prompt, plan.out_dtype)
    # the check's import ran beside the merge; only its load and generation come after it
    ctx.timings["check_import_seconds"] = answer["seconds"]["import"]
    ctx.timings["check_seconds"] = answer["seconds"]["load_and_generate"]
    ctx.metrics.update(
        name=name,
        plan=plan.describe(),
        tensors=counts,
        layers=layers,
        shards=written["shards"],
        bytes=written["bytes"],
        parents={"base": ctx.input("base").record(), "model": ctx.input("model").record()},
        side_files_from=plan.tokenizer_source,
        side_files=copied,
        # two processes, both alive to the end: this one merges, the check's loads the merged model
        merge_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        check_peak_rss_mb=answer["peak_rss_mb"],
        peak_rss_mb=round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + answer["peak_rss_mb"], 1
        ),
        sample={"prompt": cfg.sample_prompt, "output": answer["output"]},
    )
    ctx.set_output("model", format="safetensors", model_name=name, method=plan.method)


def _torch(safe_dtype: str) -> torch.dtype:
    from stages.merge.tensors import SAFE_DTYPES

    return {v: k for k, v in SAFE_DTYPES.items()}[safe_dtype]
