"""SFT throughput and model FLOP utilisation of an LFM2-1.2B-shaped model on one GPU (for a lent H100/H200).

    python3 bench/gpu_train.py [--steps 30] [--batch 8] [--seq 4096] [--packing wrapped|bfd]

Runs with what the GPU machine has (PyTorch, transformers, accelerate) plus TRL and datasets carried as
wheels (bench/README.md says how to fetch them; no registry there). No download: the model is built from
config with random weights (LFM2-1.2B's shapes: hidden 2048, 16 layers of which 6 attention, 32 heads /
8 KV heads, FFN 8192 after LFM2's auto-adjust, vocabulary 65536, tied embeddings), the tokenizer is a
word-level one made on the spot, and the data is random token ids of random lengths, packed by TRL's
`pack_dataset` into `--seq`-token rows, as the train stage does, then given to SFTTrainer with
`skip_prepare_dataset` (the stage's path) in bf16.

Reports tokens/s over the timed steps (after warm-up) and MFU = achieved model FLOP/s / the card's dense
bf16 peak. Model FLOPs per token: 6 x (matmul parameters, lm_head included) + the attention scores and
values, 6 x attention layers x hidden x sequence (causal: half of 12). Goal (train issue): MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

# dense, SXM figures from NVIDIA's sheets
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
LFM2_1_2B = {
    "vocab_size": 65536,
    "hidden_size": 2048,
    "intermediate_size": 12288,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "block_auto_adjust_ff_dim": True,
    "block_multiple_of": 256,
    "block_ffn_dim_multiplier": 1.0,
    "conv_L_cache": 3,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128000,
    "layer_types": [
        "conv",
        "conv",
        "full_attention",
        "conv",
        "conv",
        "full_attention",
        "conv",
        "conv",
        "full_attention",
        "conv",
        "full_attention",
        "conv",
        "full_attention",
        "conv",
        "full_attention",
        "conv",
    ],
}


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3"
    )


def packed_data(n_docs: int, seq: int, vocab: int, strategy: str):
    from datasets import Dataset
    from trl import pack_dataset

    rng = random.Random(0)
    docs = []
    for _ in range(n_docs):
        length = rng.randint(64, seq // 2)
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = rng.randint(8, length // 2)
        docs.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return pack_dataset(Dataset.from_list(docs), seq, strategy)


def flops_per_token(model, cfg, seq: int) -> tuple[float, int]:
    params = sum(p.numel() for p in model.parameters())
    matmul = params - cfg.vocab_size * cfg.hidden_size  # embedding lookups are not matmuls...
    matmul += cfg.vocab_size * cfg.hidden_size  # ...but the (tied) lm_head is
    attn_layers = sum(t == "full_attention" for t in cfg.layer_types)
    return 6 * matmul + 6 * attn_layers * cfg.hidden_size * seq, params


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--batch", type=int, default=8, help="sequences per step (per_device_train_batch_size)"
    )
    parser.add_argument("--seq", type=int, default=4096, help="packed sequence length (trainer.max_length)")
    parser.add_argument(
        "--packing",
        choices=["wrapped", "bfd"],
        default="wrapped",
        help="wrapped: plain causal rows (SDPA's flash path); bfd: document-aware, padding-free",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a 4-layer model on CPU for 3 steps: checks the script, measures nothing",
    )
    args = parser.parse_args()
    shape = dict(LFM2_1_2B)
    if args.smoke:
        shape.update(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["conv", "full_attention", "conv", "full_attention"],
        )
        args.steps, args.warmup, args.batch, args.seq = 3, 1, 2, 128
    elif not torch.cuda.is_available():
        raise SystemExit("a GPU is needed (or --smoke to check the script on CPU)")

    from transformers import AutoModelForCausalLM, Lfm2Config, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cfg = Lfm2Config(**shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    per_token, params = flops_per_token(model, cfg, args.seq)
    total = args.steps + args.warmup
    data = packed_data(
        int(total * args.batch * args.seq / (args.seq / 4) * 1.3), args.seq, cfg.vocab_size, args.packing
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        sft = SFTConfig(
            output_dir=out,
            max_steps=total,
            per_device_train_batch_size=args.batch,
            max_length=args.seq,
            packing=True,
            packing_strategy=args.packing,
            bf16=not args.smoke,
            use_cpu=args.smoke,
            learning_rate=2e-5,
            report_to="none",
            save_strategy="no",
            logging_steps=10,
            disable_tqdm=True,
            dataset_kwargs={"skip_prepare_dataset": True},
            gradient_checkpointing=args.gradient_checkpointing,
            dataloader_num_workers=0 if args.smoke else 2,
            include_num_input_tokens_seen="non_padding",
        )
        trainer = SFTTrainer(
            model=model,
            args=sft,
            train_dataset=data,
            processing_class=tokenizer(cfg.vocab_size),
            callbacks=[timer],
        )
        trainer.train()
    timed = timer.marks[args.warmup :]
    seconds = timed[-1] - timer.marks[args.warmup - 1]
    tokens = len(timed) * args.batch * args.seq
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    achieved = tokens / seconds * per_token
    print(
        json.dumps(
            {
                "device": name,
                "params": params,
                "seq": args.seq,
                "batch": args.batch,
                "packing": args.packing,
                "timed_steps": len(timed),
                "tokens_per_s": round(tokens / seconds),
                "model_tflops": round(achieved / 1e12, 1),
                "mfu": round(achieved / peak, 3) if peak else None,
                "peak_tflops_assumed": peak and peak / 1e12,
                "max_memory_gb": None if args.smoke else round(torch.cuda.max_memory_allocated() / 2**30, 1),
                "goal_mfu": 0.40,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
