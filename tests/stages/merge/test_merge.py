"""merge against MergeKit itself, on the architectures the paper merges, streamed and sharded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hala.contract import recipe as recipe_mod
from hala.contract import schema, step, tiny
from hala.contract.store import Store
from helpers import REPO, events, write_recipe
from stages.merge import main as mmain
from stages.merge import schedule
from stages.merge.config import MergeConfig

PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"
MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def tiny_models(store: Path) -> dict[str, Path]:
    recipe = recipe_mod.load(REPO / "recipes" / "tiny.yaml")
    return {
        role: Path(tiny.ensure(Store(str(store)), role, recipe))
        for role in ("translator", "lfm2-1.2b", "fanar-9b", "lfm2-350m")
    }


def perturbed(src: Path, dst: Path, scale: float = 0.05, dtype: torch.dtype | None = None) -> Path:
    """A 'fine-tuned' copy: the same files with every float tensor moved a little (seeded)."""
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(1)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        moved = {}
        for k, v in tensors.items():
            w = v.float() + scale * torch.randn(v.shape, generator=gen) * (
                v.float().std() if v.numel() > 1 else 1
            )
            moved[k] = w.to(dtype or v.dtype)
        save_file(moved, f, metadata={"format": "pt"})
    return dst


def random_model(kind: str, folder: Path, tokenizer_from: Path) -> Path:
    """A small Llama or Qwen2 from config, with the tiny tokenizer (for the load-and-generate check)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(LlamaConfig(**common))
        if kind == "llama"
        else Qwen2ForCausalLM(Qwen2Config(**common))
    )
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_merge(
    tmp_path: Path, store: Path, model: Path | str, base: Path | str, run: str, **config: Any
) -> tuple[int, dict | None]:
    path = write_recipe(
        tmp_path,
        {"merge-x": {"stage": "merge", "inputs": {"model": str(model), "base": str(base)}, "config": config}},
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )
    code = step.run("merge", MergeConfig, mmain.main, argv=["--recipe", str(path), "--step", "merge-x"])
    return code, Store(str(store)).read_manifest(run, "merge-x")


def run_mergekit(tmp_path: Path, config: dict[str, Any]) -> Path:
    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "mergekit-out"
    subprocess.run([str(MERGEKIT), str(cfg), str(out), "--copy-tokenizer"], check=True, capture_output=True)
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns on one line, so that neighbouring values differ by 1 across zero too."""
    bits = x.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def max_ulp(ours: Path, theirs: Path) -> int:
    """Largest distance between the two results, in bf16 units in the last place, over every element of every
    tensor."""
    a, b = tensors(ours), tensors(theirs)
    assert set(a) == set(b)
    worst = 0
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        worst = max(worst, int((_ordered(a[k]) - _ordered(b[k])).abs().max()))
    return worst


def out_dir(store: Path, run: str, m: dict) -> Path:
    return store / run / "merge-x" / m["outputs"]["model"]["path"]


def test_schema_file_matches_the_typed_config() -> None:
    assert schema.check("merge") is None


def test_lfm2_slerp_equals_mergekit_and_generates(
    tmp_path: Path, store: Path, tiny_models: dict[str, Path]
) -> None:
    code, m = run_merge(tmp_path, store, "tiny:translator", "tiny:lfm2-1.2b", "lfm2")
    assert code == 0
    ours = out_dir(store, "lfm2", m)
    assert ours.name == "tiny-translator-slerp-t0.5"
    theirs = run_mergekit(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(tiny_models["lfm2-1.2b"]),
            "models": [{"model": str(tiny_models["lfm2-1.2b"])}, {"model": str(tiny_models["translator"])}],
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
        },
    )
    assert max_ulp(ours, theirs) <= 1
    assert any("conv.conv" in k for k in tensors(ours)), "LFM2's conv layers are merged too"
    assert m["metrics"]["tensors"]["slerp"] > 0 and m["metrics"]["sample"]["output"]
    card = (ours / "README.md").read_text()
    assert "tiny:lfm2-1.2b" in card and "tiny:translator" in card and "slerp" in card and "0.5" in card
    assert m["metrics"]["parents"]["base"]["ref"] == "tiny:lfm2-1.2b"
    assert (ours / "chat_template.jinja").read_text() == (
        tiny_models["lfm2-1.2b"] / "chat_template.jinja"
    ).read_text()
    assert AutoModelForCausalLM.from_pretrained(ours).config.architectures == ["Lfm2ForCausalLM"]


@pytest.mark.parametrize("arch", ["gemma2", "qwen2", "llama"])
def test_gradient_schedules_on_other_architectures_equal_mergekit(
    tmp_path: Path, store: Path, tiny_models: dict[str, Path], arch: str
) -> None:
    if arch == "gemma2":
        base = tmp_path / "base"
        shutil.copytree(tiny_models["fanar-9b"], base)
    else:
        base = random_model(arch, tmp_path / "base", tiny_models["translator"])
    model = perturbed(base, tmp_path / "model", scale=0.3)
    t = [
        {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
        {"value": 0.5},
    ]
    code, m = run_merge(tmp_path, store, model, base, f"grad-{arch}", t=t)
    assert code == 0
    theirs = run_mergekit(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(model)}],
            "parameters": {"t": t},
            "dtype": "bfloat16",
        },
    )
    assert max_ulp(out_dir(store, f"grad-{arch}", m), theirs) <= 1


def test_the_real_smollm2_slerp_equals_mergekit(tmp_path: Path, store: Path) -> None:
    """The real model of recipes/small-real.yaml (SmolLM2-135M-Instruct from its GGUF, Llama with tied
    embeddings) against a copy moved far enough from it that its tensors take the slerp path (a few steps of
    fine-tuning leave every tensor within the colinear threshold, where both take the linear one:
    bench/small_real.py): within one bf16 ulp of MergeKit's slerp."""
    from hala.contract import gguf

    real = next(
        s
        for s in recipe_mod.load(REPO / "recipes" / "small-real.yaml").steps.values()
        if s.name == "merge-real"
    )
    raw = real.inputs["base"].raw
    base = Path(gguf.ensure(Store(str(store)), raw))
    model = perturbed(base, tmp_path / "model", scale=0.3)
    code, m = run_merge(tmp_path, store, model, raw, "real-slerp", method="slerp", t=0.5)
    assert code == 0
    assert m["metrics"]["tensors"].get("slerp", 0) > 0, m["metrics"]["tensors"]
    theirs = run_mergekit(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(model)}],
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
        },
    )
    assert max_ulp(out_dir(store, "real-slerp", m), theirs) <= 1


def test_linear_and_mergekit_yaml_and_fp32_inputs(
    tmp_path: Path, store: Path, tiny_models: dict[str, Path]
) -> None:
    base = tiny_models["fanar-9b"]
    model = perturbed(base, tmp_path / "model-fp32", scale=0.2, dtype=torch.float32)  # TRL saves fp32
    mk = {
        "merge_method": "linear",
        "models": [
            {"model": "the/base", "parameters": {"weight": 0.3}},
            {"model": "the/sft", "parameters": {"weight": 0.7}},
        ],
        "base_model": "the/base",
        "dtype": "bfloat16",
    }
    code, m = run_merge(tmp_path / "ours", store, model, base, "linear", mergekit=mk)
    assert (
        code == 0
        and m["metrics"]["plan"]["method"] == "linear"
        and m["metrics"]["tensors"] == {"linear": len(tensors(base))}
    )
    theirs = run_mergekit(
        tmp_path,
        {
            **mk,
            "base_model": str(base),
            "models": [
                {"model": str(base), "parameters": {"weight": 0.3}},
                {"model": str(model), "parameters": {"weight": 0.7}},
            ],
        },
    )
    assert max_ulp(out_dir(store, "linear", m), theirs) <= 1
    # the same merge from our own keys: t = 0.7 / (0.3 + 0.7)
    code, m2 = run_merge(tmp_path / "keys", store, model, base, "linear-keys", method="linear", t=0.7)
    assert code == 0 and max_ulp(out_dir(store, "linear-keys", m2), out_dir(store, "linear", m)) <= 1


def test_sharded_in_and_out(tmp_path: Path, store: Path, tiny_models: dict[str, Path]) -> None:
    sharded_base = tmp_path / "base-sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["lfm2-1.2b"], dtype=torch.bfloat16)
    model.save_pretrained(sharded_base, max_shard_size="300KB")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny_models["lfm2-1.2b"] / f, sharded_base / f)
    assert (sharded_base / "model.safetensors.index.json").exists()
    code, m = run_merge(tmp_path, store, "tiny:translator", sharded_base, "sharded", max_shard_size=1_000_000)
    assert code == 0
    out = out_dir(store, "sharded", m)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert m["metrics"]["shards"] == len(set(index["weight_map"].values())) > 1
    code, single = run_merge(tmp_path / "single", store, "tiny:translator", "tiny:lfm2-1.2b", "single")
    assert max_ulp(out, out_dir(store, "single", single)) == 0
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    # the shards were hashed as they were written (the commit did not read them again): the digests must be
    # the files' own, and the store's tamper check must agree
    for f in m["outputs"]["model"]["files"]:
        path = store / "sharded" / "merge-x" / f["path"]
        assert (
            hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"] and path.stat().st_size == f["bytes"]
        ), f["path"]
    Store(str(store)).verify_step("sharded", "merge-x")


def test_mismatched_checkpoints_are_exit_3_naming_the_tensor(
    tmp_path: Path, store: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    code, m = run_merge(tmp_path, store, "tiny:lfm2-350m", "tiny:lfm2-1.2b", "mismatch")
    assert code == 3 and m is None
    failure = next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")
    assert "tensor model.embed_tokens.weight: shape" in failure["error"] or "shape" in failure["error"]
    code, _ = run_merge(tmp_path / "arch", store, "tiny:fanar-9b", "tiny:lfm2-1.2b", "arch")
    assert code == 3
    assert (
        "architectures differ"
        in next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")["error"]
    )


def test_a_merge_that_cannot_generate_is_exit_3_and_not_committed(
    tmp_path: Path, store: Path, tiny_models: dict[str, Path]
) -> None:
    """Through the stage's own entrypoint (the check in its own process, started first): a base whose
    tokenizer.json is cut short gives a merged folder transformers cannot prompt; the step fails, commits
    nothing."""
    base = tmp_path / "base-broken-tokenizer"
    shutil.copytree(tiny_models["lfm2-1.2b"], base)
    (base / "tokenizer.json").write_text((base / "tokenizer.json").read_text()[:500])
    model = perturbed(tiny_models["lfm2-1.2b"], tmp_path / "model")
    path = write_recipe(
        tmp_path,
        {"merge-x": {"stage": "merge", "inputs": {"model": str(model), "base": str(base)}, "config": {}}},
        store=str(store),
        run="broken-tokenizer",
        tiny_models={"pairs": str(PAIRS)},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "stages.merge", "--recipe", str(path), "--step", "merge-x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HALA_LOG_FORMAT": "json"},
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    failure = next(e for e in events(proc.stdout) if e.get("event") == "failed")
    assert (
        "does not load or generate with transformers" in failure["error"] and "tokenizer" in failure["error"]
    )
    assert Store(str(store)).read_manifest("broken-tokenizer", "merge-x") is None
    status = Store(str(store)).read_statuses("broken-tokenizer")["merge-x"]
    assert status["state"] == "failed" and status["exit_code"] == 3
    # without any tokenizer the step stops before merging, saying where the tokenizer comes from
    for f in base.glob("tokenizer*"):
        f.unlink()
    code, m = run_merge(tmp_path / "none", store, model, base, "no-tokenizer")
    assert code == 3 and m is None
    status = Store(str(store)).read_statuses("no-tokenizer")["merge-x"]
    assert "input 'base'" in status["error"] and "tokenizer_source" in status["error"]


def test_config_mistakes_are_exit_2(
    tmp_path: Path, store: Path, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    code, _ = run_merge(tmp_path / "a", store, "tiny:translator", "tiny:lfm2-1.2b", "bad-t", t=1.5)
    assert code == 2 and "t must lie in [0, 1]" in capsys.readouterr().out
    code, _ = run_merge(
        tmp_path / "b",
        store,
        "tiny:translator",
        "tiny:lfm2-1.2b",
        "both",
        t=0.5,
        mergekit={
            "merge_method": "slerp",
            "base_model": "a",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"t": 0.5},
        },
    )
    assert code == 2 and "either mergekit or method/t" in capsys.readouterr().out
    code, _ = run_merge(
        tmp_path / "c",
        store,
        "tiny:translator",
        "tiny:lfm2-1.2b",
        "ties",
        mergekit={"merge_method": "ties", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]},
    )
    assert code == 2 and "merge_method 'ties' is not supported" in capsys.readouterr().out


def test_schedule_semantics() -> None:
    """MergeKit's: gradients over layers (first value outside them), first matching filter wins."""
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.25}]
    plan = schedule.Plan(method="slerp", t_setting=t)
    assert plan.t("model.layers.0.self_attn.q_proj.weight", 5)[1] == 0.0
    assert plan.t("model.layers.2.self_attn.q_proj.weight", 5)[1] == 0.5
    assert plan.t("model.layers.4.self_attn.q_proj.weight", 5)[1] == 1.0
    assert plan.t("model.layers.3.mlp.up_proj.weight", 5)[1] == 0.25
    assert schedule.Plan(method="slerp", t_setting=[0.2, 0.8]).t("model.embed_tokens.weight", 5)[1] == 0.2
