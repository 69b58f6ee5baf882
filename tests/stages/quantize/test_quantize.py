"""quantize on the tiny stand-ins: real llm-compressor, real compressed-tensors checkpoints, a fidelity
check that is measured and can fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hala.contract import recipe as recipe_mod
from hala.contract import schema, step, tiny
from hala.contract.errors import ConfigError
from hala.contract.store import Store
from hala.kit import engine
from helpers import REPO, events, output_dir, write_recipe
from stages.quantize import fidelity
from stages.quantize import main as qmain
from stages.quantize.config import QuantizeConfig

PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the session: each tiny stand-in is built once, in <store>/_sources/."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample pairs as a prepared pairs dataset (the schema prepare writes)."""
    folder = tmp_path_factory.mktemp("sample") / "data"
    folder.mkdir()
    rows = [
        {"id": f"s:{i}", "origin": "s", "src_lang": "en", "tgt_lang": "ar", "src": en, "tgt": ar}
        for i, (en, ar) in enumerate(tiny.read_pairs(PAIRS))
    ]
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-00000.parquet")
    return folder


def quantize(
    tmp_path: Path, store: Path, model: str, sample: Path, run: str, **config: Any
) -> tuple[int, dict | None]:
    inputs = {"model": model, "sample": str(sample)}
    if "calibration" in config:
        inputs["calibration"] = str(config.pop("calibration"))
    path = write_recipe(
        tmp_path,
        {"quantize-x": {"stage": "quantize", "inputs": inputs, "config": config}},
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )
    code = step.run(
        "quantize", QuantizeConfig, qmain.main, argv=["--recipe", str(path), "--step", "quantize-x"]
    )
    return code, Store(str(store)).read_manifest(run, "quantize-x")


def test_schema_file_matches_the_typed_config() -> None:
    assert schema.check("quantize") is None


def test_fp8_dynamic_teacher_is_a_compressed_tensors_checkpoint_that_generates(
    tmp_path: Path, store: Path, sample: Path
) -> None:
    code, m = quantize(tmp_path, store, "tiny:teacher", sample, "fp8", fidelity_rows=32)
    assert code == 0
    out = store / "fp8" / "quantize-x" / m["outputs"]["model"]["path"]
    assert out.name == "tiny-teacher-FP8-Dynamic"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["type"] == "float"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    assert qc["ignore"] == ["lm_head"]
    for name in ("recipe.yaml", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).exists(), name
    weights = load_file(out / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert "lm_head.weight" not in weights or weights["lm_head.weight"].dtype == torch.bfloat16
    f = m["metrics"]["fidelity"]
    assert f["rows"] == 32 and f["ppl_increase"] <= 0.05 and f["argmax_agreement"] > 0.9
    assert m["metrics"]["quantized_modules"] == 28 and m["metrics"]["device"]["type"] == "cpu"
    assert m["metrics"]["size_ratio"] < 0.7
    # the way a consumer loads it
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Translate from English to Arabic: Good morning."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True) == "صباح الخير."
    # a stage that serves it checks the hardware first: emulated on CPU (said), refused on a GPU without FP8
    assert engine.check_fp8_hardware(str(out), devices=[]) == "cpu-emulated"
    assert engine.check_fp8_hardware(str(out), devices=[("NVIDIA H100 80GB HBM3", (9, 0))]) == "native"
    assert engine.check_fp8_hardware(str(out), devices=[("NVIDIA L40S", (8, 9))]) == "native"
    with pytest.raises(ConfigError, match=r"NVIDIA A100-SXM4-80GB \(compute capability 8.0\).*>= 8.9") as e:
        engine.check_fp8_hardware(str(out), devices=[("NVIDIA A100-SXM4-80GB", (8, 0))])
    assert e.value.exit_code == 2
    source = store / "_sources"
    bf16 = next(p.parent for p in source.rglob("config.json") if "quantization_config" not in p.read_text())
    assert engine.check_fp8_hardware(str(bf16), devices=[("NVIDIA A100-SXM4-80GB", (8, 0))]) is None


@pytest.mark.parametrize(
    "role,arch_modules",
    [
        ("translator", {"Conv1d"}),  # LFM2's depthwise short convolution is not a Linear: it stays bf16
        ("fanar-9b", set()),
        ("judge", set()),
    ],
)
def test_every_architecture_we_use(
    tmp_path: Path, store: Path, sample: Path, role: str, arch_modules: set[str]
) -> None:
    code, m = quantize(
        tmp_path, store, f"tiny:{role}", sample, f"arch-{role}", fidelity_rows=8, max_ppl_increase=0.5
    )
    assert code == 0
    kept = m["metrics"]["not_quantized"]
    assert arch_modules <= set(kept)
    assert kept["Linear"] == ["lm_head"]
    if role == "translator":
        assert any(n.endswith("conv.in_proj") for n in m["metrics"]["quantized"])
        assert all(n.endswith(".conv.conv") for n in kept["Conv1d"])


def test_corrupted_scales_fail_the_fidelity_check(
    tmp_path: Path, store: Path, sample: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Weight scales multiplied by 8 after saving: the check must notice and refuse to commit (exit 3)."""
    original = qmain.save_checkpoint

    def save_then_corrupt(model: Any, tok: Any, out: str) -> None:
        original(model, tok, out)
        path = Path(out) / "model.safetensors"
        tensors = load_file(path)
        scaled = {k: (v * 8 if k.endswith("weight_scale") else v) for k, v in tensors.items()}
        assert any(k.endswith("weight_scale") for k in tensors)
        save_file(scaled, path, metadata={"format": "pt"})

    monkeypatch.setattr(qmain, "save_checkpoint", save_then_corrupt)
    code, m = quantize(tmp_path, store, "tiny:teacher", sample, "corrupt", fidelity_rows=16)
    assert code == 3 and m is None
    failure = next(e for e in events(capsys.readouterr().out) if e.get("event") == "failed")
    assert "fails its fidelity check: perplexity rose" in failure["error"]


def test_schemes_that_measure_activations_need_calibration_data(
    tmp_path: Path, store: Path, sample: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _ = quantize(tmp_path / "a", store, "tiny:teacher", sample, "static", scheme="FP8")
    assert code == 2
    assert "give the step an input 'calibration'" in capsys.readouterr().out
    code, m = quantize(
        tmp_path / "b",
        store,
        "tiny:teacher",
        sample,
        "static",
        scheme="FP8",
        calibration=sample,
        calibration_rows=16,
        fidelity_rows=8,
        max_ppl_increase=0.5,
    )
    assert code == 0
    out = store / "static" / "quantize-x" / m["outputs"]["model"]["path"]
    assert out.name == "tiny-teacher-FP8"
    acts = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "input_activations"
    ]
    assert acts["dynamic"] is False and "model.layers.0.self_attn.q_proj.input_scale" in load_file(
        out / "model.safetensors"
    )


def test_the_offline_list_of_static_activation_schemes_is_compressed_tensors_own() -> None:
    # the recipe loader decides "needs calibration" without compressed-tensors (any environment can plan a
    # run)
    from typing import get_args

    from compressed_tensors.quantization import preset_name_to_scheme

    from stages.quantize.config import STATIC_ACTIVATIONS, Scheme

    measured = {
        s
        for s in get_args(Scheme)
        if (a := preset_name_to_scheme(s, ["Linear"]).input_activations) is not None and a.dynamic is not True
    }
    assert measured == STATIC_ACTIVATIONS


def test_sequential_mode_measures_the_same_as_together(store: Path, sample: Path) -> None:
    recipe = recipe_mod.load(REPO / "recipes" / "tiny.yaml")
    src = tiny.ensure(Store(str(store)), "teacher", recipe)
    assert (Path(store) / "fp8" / "quantize-x" / "_MANIFEST.json").exists(), "runs after the FP8 test"
    q = output_dir(Path(store), "fp8", "quantize-x", "model")
    assert q.name == "tiny-teacher-FP8-Dynamic"
    tok = AutoTokenizer.from_pretrained(src)
    cfg = QuantizeConfig()
    items = fidelity.encode(tok, qmain.read_chats(str(sample), cfg, 12), 256)
    load_s = lambda: AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()  # noqa: E731
    load_q = lambda: AutoModelForCausalLM.from_pretrained(q).eval()  # noqa: E731
    together = fidelity.compare(load_s, load_q, items, "together")
    sequential = fidelity.compare(load_s, load_q, items, "sequential")
    for key in (
        "ppl_source",
        "ppl_quantized",
        "mean_abs_logit_diff",
        "max_abs_logit_diff",
        "argmax_agreement",
    ):
        assert together[key] == pytest.approx(sequential[key], rel=1e-5), key
    assert together["tokens"] == sequential["tokens"] > 0
