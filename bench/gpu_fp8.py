"""FP8 (as FP8_DYNAMIC computes it) against bf16 matrix products of Command-A-shaped projections, on one GPU.

    python bench/gpu_fp8.py [--batches 1,16,64,256,1024,4096] [--repeat 50] [--json out.json]

Needs only PyTorch and a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell); nothing is downloaded.
FP8_DYNAMIC = per-output-channel FP8 (E4M3) weight scales fixed at quantization time, and per-token FP8
activation scales computed at run time. Each FP8 timing therefore includes quantizing the activations
(amax per token, scale, cast), then `torch._scaled_mm` with row-wise scales; "gemm only" leaves the
activation quantization out. The relative error is ||fp8 - bf16|| / ||bf16|| over the output.

Shapes: Command A (111B): hidden 12288, 96 query heads and 8 key/value heads of 128, MLP 36864 (gated).
The paper's ~2x is end-to-end serving throughput of the whole model; this measures the projections only.

    --cpu-check   verifies the quantization math on CPU (no timing, no GPU): dequantized FP8 products
                  against bf16, on small shapes; exits 0 when the error is in FP8's expected range.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 12288, 96, 8, 128, 36864
SHAPES = {  # name: (in_features K, out_features N)
    "q_proj": (HIDDEN, HEADS * HEAD_DIM),
    "kv_proj (k and v fused)": (HIDDEN, 2 * KV_HEADS * HEAD_DIM),
    "o_proj": (HEADS * HEAD_DIM, HIDDEN),
    "gate_up_proj (fused)": (HIDDEN, 2 * MLP),
    "down_proj": (MLP, HIDDEN),
}
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scale (rows of W [N, K]), fixed once: FP8_DYNAMIC's weights."""
    scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token scale, computed for every call: FP8_DYNAMIC's activations."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def timed(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1000.0


def bench_gpu(batches: list[int], repeat: int) -> dict:
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 9):
        sys.exit(
            f"{torch.cuda.get_device_name(0)} has compute capability {major}.{minor}: FP8 matrix products "
            "need >= 8.9"
        )
    torch.manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch.bfloat16)
        wq, ws = quantize_weight(w)
        wq_t, ws_t = wq.t(), ws.t().contiguous()  # [K, N] column-major, scales [1, N]
        for m in batches:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = x @ w.t()
            xq, xs = quantize_tokens(x)
            out = torch._scaled_mm(xq, wq_t, scale_a=xs, scale_b=ws_t, out_dtype=torch.bfloat16)
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            # the loop's tensors bound as defaults: each closure times this batch size's tensors
            t_bf16 = timed(lambda x=x, w=w: x @ w.t(), repeat)
            t_gemm = timed(
                lambda xq=xq, xs=xs, wq_t=wq_t, ws_t=ws_t: torch._scaled_mm(
                    xq, wq_t, scale_a=xs, scale_b=ws_t, out_dtype=torch.bfloat16
                ),
                repeat,
            )

            def fp8_call(
                x: torch.Tensor = x, wq_t: torch.Tensor = wq_t, ws_t: torch.Tensor = ws_t
            ) -> torch.Tensor:
                q, s = quantize_tokens(x)
                return torch._scaled_mm(q, wq_t, scale_a=s, scale_b=ws_t, out_dtype=torch.bfloat16)

            t_fp8 = timed(fp8_call, repeat)
            flops = 2.0 * m * k * n
            rows.append(
                {
                    "shape": name,
                    "M": m,
                    "K": k,
                    "N": n,
                    "bf16_ms": round(t_bf16 * 1e3, 4),
                    "fp8_gemm_ms": round(t_gemm * 1e3, 4),
                    "fp8_with_act_quant_ms": round(t_fp8 * 1e3, 4),
                    "speedup_gemm": round(t_bf16 / t_gemm, 3),
                    "speedup_with_act_quant": round(t_bf16 / t_fp8, 3),
                    "bf16_tflops": round(flops / t_bf16 / 1e12, 1),
                    "fp8_tflops": round(flops / t_gemm / 1e12, 1),
                    "rel_error": round(err, 5),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": f"{major}.{minor}",
        "torch": torch.__version__,
        "rows": rows,
    }


def cpu_check() -> int:
    """The quantization math, dequantized, against bf16 on CPU: FP8 E4M3 keeps ~2-3% relative error per
    product."""
    torch.manual_seed(0)
    worst = 0.0
    for k, n, m in ((512, 256, 8), (1024, 384, 32)):
        w = (torch.randn(n, k) * k**-0.5).to(torch.bfloat16)
        x = torch.randn(m, k).to(torch.bfloat16)
        wq, ws = quantize_weight(w)
        xq, xs = quantize_tokens(x)
        approx = (xq.float() * xs) @ (wq.float() * ws).t()
        ref = x.float() @ w.float().t()
        err = float((approx - ref).norm() / ref.norm())
        worst = max(worst, err)
        print(json.dumps({"K": k, "N": n, "M": m, "rel_error": round(err, 5)}))
    ok = 0.005 < worst < 0.08
    print(
        f"cpu check: worst relative error {worst:.4f} ({'in' if ok else 'OUT OF'} FP8 E4M3's expected range)"
    )
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64,256,1024,4096")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cpu-check", action="store_true")
    args = p.parse_args()
    if args.cpu_check:
        return cpu_check()
    if not torch.cuda.is_available():
        print(
            "no CUDA device: run this on a GPU machine (or --cpu-check to verify the math here)",
            file=sys.stderr,
        )
        return 2
    t0 = time.time()
    result = bench_gpu([int(b) for b in args.batches.split(",")], args.repeat)
    result["seconds"] = round(time.time() - t0, 1)
    print(f"\n{result['device']} (capability {result['capability']}), torch {result['torch']}")
    print(f"{'shape':26} {'M':>5} {'bf16 ms':>9} {'fp8 ms':>9} {'x gemm':>7} {'x +quant':>8} {'rel err':>8}")
    for r in result["rows"]:
        print(
            f"{r['shape']:26} {r['M']:5} {r['bf16_ms']:9.4f} {r['fp8_with_act_quant_ms']:9.4f} "
            f"{r['speedup_gemm']:7.2f} "
            f"{r['speedup_with_act_quant']:8.2f} {r['rel_error']:8.5f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
