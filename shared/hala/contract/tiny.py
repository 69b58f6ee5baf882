"""Build tiny stand-in models (`tiny:<role>`) with the paper's real architectures, without a hub.

    python -m hala.contract.tiny teacher --recipe recipes/tiny.yaml --out /tmp/tiny-teacher  # one, by hand

A build is: a byte-level BPE tokenizer trained on the recipe's sample pairs (English and Arabic) with a
ChatML chat template that carries `{% generation %}` markers (assistant-only loss in TRL), a model of the
role's architecture initialised from config, and for the teacher, judge and translator a short training
run on the sample pairs until they reproduce them. The result is an ordinary Hugging Face folder
(safetensors, config, tokenizer, chat template, generation config): every stage sees it as it would
see the real model. `ensure()` builds once into `<store>/_sources/tiny-<role>-<spec hash>/`, with a manifest,
and reuses it while the spec (hala.contract.tiny_spec) is unchanged.

torch, transformers and tokenizers are imported inside the functions: importing hala stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hala.contract import artifact, logs, spans, tiny_spec
from hala.contract.hashing import sha256_json
from hala.contract.store import Identity, Store, describe_local, new_manifest, now, output_entry

# ids 0-3 follow LFM2's pad / bos / eos naming; <|endoftext|> is there because transformers' Qwen2 tokenizer
# class adds it as unk when missing, which would make the judge's tokenizer one token longer than its model.
SPECIAL = ["<|pad|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>"]
VOCAB = 2048
MAX_LEN = 160

# ChatML as LFM2 writes it; assistant turns inside {% generation %} so TRL can mask everything else.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ m['content'] }}"
    "{%- if m.tool_calls is defined and m.tool_calls -%}{%- for c in m.tool_calls -%}"
    "{{ '<tool_call>' }}{{ c['function'] | tojson }}{{ '</tool_call>' }}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# How long each trained role trains: fixed step counts keep builds deterministic across machines;
# the recipe's tiny_models.max_seconds (default 900) only guards against a hung build.
TRAIN = {
    "translate": {"steps": 360, "lr": 3e-3, "batch": 16},
    "judge": {"steps": 900, "lr": 2e-3, "batch": 16},
}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or not {"en", "ar"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a TSV with columns id, en, ar")
    return [(r["en"], r["ar"]) for r in rows]


def build_tokenizer(pairs: list[tuple[str, str]], prompts: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for pair in with_markers(pairs) for t in pair]
    texts += [p for v in prompts.values() for p in (v.values() if isinstance(v, dict) else [v])]
    texts += ["ACCEPT", "REJECT", "system", "user", "assistant", "tool", "<tool_call>", "</tool_call>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=1,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(role: str, vocab_size: int) -> Any:
    import torch
    import transformers

    info = tiny_spec.TINY_ROLES[role]
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    cfg = dict(info["config"])
    arch = info["arch"]
    if arch == "lfm2":
        hidden = cfg["hidden_size"]
        # vLLM reads conv_dim / block_dim, which a config built from scratch lacks (vllm-cpu.md)
        config = transformers.Lfm2Config(
            **cfg,
            **common,
            conv_L_cache=3,
            block_auto_adjust_ff_dim=False,
            conv_dim=hidden,
            conv_dim_out=hidden,
            block_dim=hidden,
            block_ff_dim=cfg["intermediate_size"],
        )
        cls = transformers.Lfm2ForCausalLM
    elif arch == "cohere2":
        n = cfg["num_hidden_layers"]
        layer_types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)]
        config = transformers.Cohere2Config(**cfg, **common, layer_types=layer_types)
        cls = transformers.Cohere2ForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**cfg, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "gemma2":
        config = transformers.Gemma2Config(**cfg, **common)
        cls = transformers.Gemma2ForCausalLM
    else:
        raise ValueError(f"unknown architecture {arch}")
    torch.manual_seed(0)
    return cls(config)


def with_markers(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs, plus each pair whose protected spans (LaTeX, code, ...) the translate stage replaces by
    markers, in that masked form: the stand-ins then carry markers through as a real translator must."""
    out = list(pairs)
    for en, ar in pairs:
        m_en, s_en, _ = spans.protect(en)
        m_ar, s_ar, _ = spans.protect(ar)
        if s_en and s_en == s_ar:
            out.append((m_en, m_ar))
    return out


def _mismatches(pairs: list[tuple[str, str]], i: int) -> list[str]:
    """Arabic sides of three other pairs, at fixed offsets: the judge's REJECT examples for pair i."""
    n = len(pairs)
    return [pairs[(i + max(1, n * k // 4)) % n][1] for k in (1, 2, 3)]


def training_examples(
    role: str, pairs: list[tuple[str, str]], prompts: dict[str, Any]
) -> list[list[dict[str, str]]]:
    """Chats the role learns: translation both ways, or ACCEPT for aligned pairs and REJECT for shifted
    ones."""
    info = tiny_spec.TINY_ROLES[role]
    chats = []
    if info["train"] == "translate":
        p = prompts[role if role in prompts else "teacher"]
        for en, ar in with_markers(pairs):
            chats.append(
                [
                    {"role": "user", "content": p["en-ar"].format(text=en)},
                    {"role": "assistant", "content": ar},
                ]
            )
            chats.append(
                [
                    {"role": "user", "content": p["ar-en"].format(text=ar)},
                    {"role": "assistant", "content": en},
                ]
            )
    elif info["train"] == "judge":
        # Translating the pairs too teaches which Arabic belongs to which English; the verdicts alone
        # leave a small model guessing for a long, seed-dependent while before it finds that link.
        # Three mismatched partners per pair for one match make it strict: a combination it has never
        # seen is rejected, as the paper's judge rejects unaligned OPUS pairs.
        p = prompts["teacher"]
        for i, (en, ar) in enumerate(pairs):
            chats.append(
                [
                    {"role": "user", "content": p["en-ar"].format(text=en)},
                    {"role": "assistant", "content": ar},
                ]
            )
            chats.append(
                [
                    {"role": "user", "content": prompts["judge"].format(src=en, tgt=ar)},
                    {"role": "assistant", "content": "ACCEPT"},
                ]
            )
            for wrong in _mismatches(pairs, i):
                chats.append(
                    [
                        {"role": "user", "content": prompts["judge"].format(src=en, tgt=wrong)},
                        {"role": "assistant", "content": "REJECT"},
                    ]
                )
    return chats


def _encode(tok: Any, chats: list[list[dict[str, str]]]) -> list[tuple[list[int], list[int]]]:
    out = []
    for chat in chats:
        enc = tok.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])[:MAX_LEN]
        mask = list(enc["assistant_masks"])[:MAX_LEN]
        out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def train(
    model: Any,
    tok: Any,
    chats: list[list[dict[str, str]]],
    steps: int,
    lr: float,
    batch: int,
    max_seconds: float,
    log: Any,
) -> dict[str, Any]:
    """Plain next-token training on the assistant tokens (fp32, fixed seed, fixed order)."""
    import torch

    torch.manual_seed(0)
    rng = random.Random(0)
    data = _encode(tok, chats)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps)
    )
    model.train()
    losses: list[float] = []
    t0 = time.monotonic()
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch:
            more = list(range(len(data)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch], order[batch:]
        width = max(len(data[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id)
        labels = torch.full((len(idx), width), -100)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # right padding for training; generation pads left
            seq, lab = data[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(lab)] = torch.tensor(lab)
            att[row, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
        if time.monotonic() - t0 > max_seconds:
            # A stand-in stopped early is a different model (a judge at 357 of 900 steps rejected every pair):
            # fail, rather than let a busy machine change what the pipeline computes.
            from hala.contract.errors import TemporaryError

            raise TemporaryError(
                f"tiny model training took more than tiny_models.max_seconds={max_seconds:g} s at step "
                f"{step + 1} of {steps}; the machine is busier than usual: rerun, or raise max_seconds"
            )
    model.eval()
    return {
        "steps": len(losses),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_curve": losses[:: max(1, len(losses) // 40)],
        "train_seconds": round(time.monotonic() - t0, 2),
    }


def generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to single-turn chats, batched with left padding."""
    import torch

    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return [tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out]


def reproduction(
    role: str, model: Any, tok: Any, pairs: list[tuple[str, str]], prompts: dict[str, Any]
) -> dict[str, Any]:
    """How well a trained stand-in reproduces its pairs: exact matches, and Arabic script in EN->AR output."""
    import re

    info = tiny_spec.TINY_ROLES[role]
    arabic = re.compile(r"[\u0600-\u06FF]")
    letters = re.compile(r"[A-Za-z\u0600-\u06FF]")
    if info["train"] == "translate":
        p = prompts[role if role in prompts else "teacher"]
        outs = generate(model, tok, [p["en-ar"].format(text=en) for en, _ in pairs])
        exact = sum(o == ar for o, (_, ar) in zip(outs, pairs))
        ar_share = sum(len(arabic.findall(o)) for o in outs) / max(
            1, sum(len(letters.findall(o)) for o in outs)
        )
        return {
            "exact_match": round(exact / len(pairs), 3),
            "arabic_script_share": round(ar_share, 3),
            "sample": outs[:3],
        }
    asks = [prompts["judge"].format(src=en, tgt=ar) for en, ar in pairs]
    asks += [prompts["judge"].format(src=en, tgt=_mismatches(pairs, i)[0]) for i, (en, _) in enumerate(pairs)]
    want = ["ACCEPT"] * len(pairs) + ["REJECT"] * len(pairs)
    outs = generate(model, tok, asks, max_new_tokens=4)
    return {"verdict_accuracy": round(sum(o == w for o, w in zip(outs, want)) / len(want), 3)}


def build(
    role: str, pairs_file: Path, prompts: dict[str, Any], out: Path, max_seconds: float = 900.0
) -> dict[str, Any]:
    """Build one stand-in into `out` (a Hugging Face folder); returns what it measured."""
    import torch
    from transformers import GenerationConfig

    log = logs.get("hala.tiny")
    torch.manual_seed(0)
    t0 = time.monotonic()
    pairs = read_pairs(pairs_file)
    tok = build_tokenizer(pairs, prompts)
    model = build_model(role, len(tok))
    info: dict[str, Any] = {
        "role": role,
        "arch": tiny_spec.TINY_ROLES[role]["arch"],
        "stands_for": tiny_spec.TINY_ROLES[role]["stands_for"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
    }
    kind = tiny_spec.TINY_ROLES[role]["train"]
    if kind:
        settings = TRAIN[kind]
        info["training"] = train(
            model,
            tok,
            training_examples(role, pairs, prompts),
            settings["steps"],
            settings["lr"],
            settings["batch"],
            max_seconds,
            log,
        )
    model.to(torch.bfloat16)  # saved in bf16, like the real checkpoints; measured as saved
    if kind:
        info["reproduction"] = reproduction(role, model, tok, pairs, prompts)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shown = {k: v for k, v in info.items() if k != "training"}
    shown = {k: v for k, v in info.items() if k != "training"}
    (out / "README.md").write_text(
        f"# tiny-{role}\n\nA tiny stand-in for `{info['stands_for']}` ({info['arch']} architecture, "
        f"{info['parameters']:,} parameters), built by hala.contract.tiny from the recipe's sample pairs. "
        "Not a real model: it exists so that every stage runs its real code paths on a CPU.\n\n"
        f"```json\n{json.dumps(shown, ensure_ascii=False, indent=2)}\n```\n",
        encoding="utf-8",
    )
    info["build_seconds"] = round(time.monotonic() - t0, 2)
    log.info(
        "tiny model built",
        **{k: v for k, v in info.items() if k not in ("training",)},
        final_loss=info.get("training", {}).get("final_loss"),
    )
    return info


def ensure(store: Store, role: str, recipe: Any) -> str:
    """Local folder of `tiny:<role>` for this recipe: committed into <store>/_sources/ on first use, then
    reused.

    The build itself happens once per machine: it lands in the content-addressed cache (HALA_TINY_CACHE, else
    hala.contract.store.cache_root()/tiny, keyed by the spec's hash) and every store that needs the same
    stand-in commits a copy of it (hala.contract.artifact: the store's lease, then the cache entry's lock, so
    processes side by side, test suites or compose services, wait for one builder and one commit instead of
    training twice)."""
    spec = tiny_spec.spec(role, recipe)
    key = sha256_json(spec)
    name = tiny_spec.source_name(role, key)
    manifest, _ = artifact.ensure(
        store,
        "_sources",
        name,
        key,
        lambda folder: _commit_from_cache(role, recipe, spec, key, folder),
        logs.get("hala.tiny"),
    )
    return store.localize("_sources", name, manifest, "model")


@contextlib.contextmanager
def _locked(role: str, key: str) -> Any:
    """The cache entry of this build (a folder, maybe not there yet), locked for this process."""
    import fcntl

    from hala.contract.store import cache_root

    # HALA_TINY_CACHE: `hala test` points every suite at one folder, so each stand-in trains once per machine
    root = Path(os.environ.get("HALA_TINY_CACHE") or cache_root() / "tiny")
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"{role}-{key[:24]}"
    with open(root / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield entry


def cached_build(role: str, recipe: Any, spec: dict[str, Any], entry: Path) -> tuple[Path, dict[str, Any]]:
    """(model folder, build info) of this spec in the machine cache, building it first if no one has; the
    caller holds the entry's lock (_locked)."""
    if not (entry / "info.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            info = build(
                role,
                tiny_spec.pairs_path(recipe),
                spec["prompts"],
                tmp / "model",
                float(recipe.tiny_models.get("max_seconds", 900)),
            )
            # written last: the entry is whole
            (tmp / "info.json").write_text(json.dumps(info, ensure_ascii=False))
            if entry.exists():
                shutil.rmtree(entry)  # a half-written entry of a killed builder
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / "model", json.loads((entry / "info.json").read_text())


def _commit_from_cache(role: str, recipe: Any, spec: dict[str, Any], key: str, folder: str) -> dict[str, Any]:
    """The stand-in's files under folder/model (copied: the machine cache keeps its own) and its manifest."""
    started = now()
    with _locked(role, key) as entry:
        cached, info = cached_build(role, recipe, spec, entry)
        shutil.copytree(cached, os.path.join(folder, "model"))
    files = describe_local(folder, "model")
    return new_manifest(
        run="_sources",
        step=Identity(tiny_spec.source_name(role, key), "hala.tiny", spec["builder"], spec, key),
        fingerprint=key,
        inputs={
            "pairs": {"ref": recipe.tiny_models.get("pairs"), "kind": "path", "sha256": spec["pairs_sha256"]}
        },
        outputs={"model": output_entry(files, "model", "model", None, format="huggingface", role=role)},
        counts=None,
        quarantine={"rows": 0, "by_reason": {}},
        metrics={**info, "cache": str(cached.parent)},
        timings={"started": started, "finished": now(), "seconds": info["build_seconds"]},
        shards=None,
    )


def main(argv: list[str] | None = None) -> int:
    from hala.contract import recipe as recipe_mod

    p = argparse.ArgumentParser(
        prog="python -m hala.contract.tiny",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("role", choices=sorted(tiny_spec.TINY_ROLES))
    p.add_argument("--recipe", required=True, help="the recipe whose tiny_models section to use")
    p.add_argument("--out", help="write the folder here instead of into the recipe's store")
    p.add_argument("--store", help="store for ensure() (default: the recipe's)")
    args = p.parse_args(argv)
    logs.setup()
    recipe = recipe_mod.load(args.recipe, store=args.store, check_paths=False)
    if args.out:
        spec = tiny_spec.spec(args.role, recipe)
        build(
            args.role,
            tiny_spec.pairs_path(recipe),
            spec["prompts"],
            Path(args.out),
            float(recipe.tiny_models.get("max_seconds", 900)),
        )
        print(args.out)
    else:
        print(ensure(Store(recipe.store), args.role, recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
