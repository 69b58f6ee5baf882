"""tiny:<role> stand-ins: the paper's architectures, built without a hub, cached in the store, trained
teacher/judge/translator that reproduce the sample pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hala.contract import recipe as recipe_mod
from hala.contract import tiny, tiny_spec
from hala.contract.errors import DataError
from hala.contract.hashing import sha256_json
from hala.contract.store import Store
from helpers import REPO

ARCH = {
    "teacher": "Cohere2ForCausalLM",
    "judge": "Qwen2ForCausalLM",
    "translator": "Lfm2ForCausalLM",
    "lfm2-350m": "Lfm2ForCausalLM",
    "lfm2-700m": "Lfm2ForCausalLM",
    "lfm2-1.2b": "Lfm2ForCausalLM",
    "fanar-9b": "Gemma2ForCausalLM",
}


def _name(role: str, recipe) -> str:
    """The stand-in's folder under _sources/: keyed by the hash of its spec, not by its role alone."""
    return tiny_spec.source_name(role, sha256_json(tiny_spec.spec(role, recipe)))


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, object, dict[str, str]]:
    store = Store(str(tmp_path_factory.mktemp("store")))
    recipe = recipe_mod.load(REPO / "recipes" / "tiny.yaml")
    paths = {role: tiny.ensure(store, role, recipe) for role in tiny_spec.TINY_ROLES}
    return store, recipe, paths


def test_every_role_has_its_architecture_and_loads_like_a_real_model(built) -> None:
    store, recipe, paths = built
    assert set(paths) == set(ARCH)
    for role, path in paths.items():
        config = AutoConfig.from_pretrained(path)
        assert config.architectures == [ARCH[role]], role
        assert (Path(path) / "model.safetensors").exists() and (Path(path) / "chat_template.jinja").exists()
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.vocab_size == len(tok)
        ids = tok.apply_chat_template(
            [{"role": "user", "content": "مرحبا"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids["input_ids"].shape[1]
        m = store.read_manifest("_sources", _name(role, recipe))
        assert m["metrics"]["stands_for"] == tiny_spec.TINY_ROLES[role]["stands_for"]
    lfm2 = json.loads((Path(paths["translator"]) / "config.json").read_text())
    assert lfm2["conv_dim"] == lfm2["block_dim"] == lfm2["hidden_size"]  # vLLM needs them
    assert "conv" in lfm2["layer_types"] and "full_attention" in lfm2["layer_types"]
    sizes = [
        AutoConfig.from_pretrained(paths[r]).hidden_size for r in ("lfm2-350m", "lfm2-700m", "lfm2-1.2b")
    ]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_chat_template_marks_only_assistant_tokens(built) -> None:
    _, _, paths = built
    tok = AutoTokenizer.from_pretrained(paths["translator"])
    assert "{% generation %}" in tok.chat_template
    chat = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "اثنان زائد اثنين يساوي أربعة."},
    ]
    enc = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "اثنان زائد اثنين يساوي أربعة.<|im_end|>"


@pytest.mark.parametrize("role", ["teacher", "translator"])
def test_translators_reproduce_the_sample_pairs(built, role: str) -> None:
    store, recipe, paths = built
    metrics = store.read_manifest("_sources", _name(role, recipe))["metrics"]
    assert metrics["reproduction"]["exact_match"] >= 0.9
    assert metrics["reproduction"]["arabic_script_share"] >= 0.9
    assert metrics["training"]["final_loss"] < metrics["training"]["first_loss"] / 10
    # checked again here, from the saved folder, the way a stage would load it
    pairs = tiny.read_pairs(tiny_spec.pairs_path(recipe))[:8]
    prompt = tiny_spec.DEFAULT_PROMPTS[role]["en-ar"]
    model = AutoModelForCausalLM.from_pretrained(paths[role], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(paths[role])
    outs = tiny.generate(model, tok, [prompt.format(text=en) for en, _ in pairs])
    assert sum(o == ar for o, (_, ar) in zip(outs, pairs)) >= 6, outs


def test_judge_separates_aligned_from_shifted_pairs(built) -> None:
    store, recipe, _ = built
    assert (
        store.read_manifest("_sources", _name("judge", recipe))["metrics"]["reproduction"]["verdict_accuracy"]
        >= 0.9
    )


def test_untrained_bases_are_random_stand_ins(built) -> None:
    store, recipe, _ = built
    for role in ("lfm2-350m", "lfm2-700m", "lfm2-1.2b", "fanar-9b"):
        assert "training" not in store.read_manifest("_sources", _name(role, recipe))["metrics"]


def test_built_once_then_reused_and_rebuilt_when_the_pairs_change(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    shutil.copy(REPO / "recipes" / "samples" / "pairs.en-ar.tsv", pairs)
    (tmp_path / "r.yaml").write_text(
        "name: t\nstore: x\nrun: r\ntiny_models: {pairs: pairs.tsv}\n"
        f"steps: {{prepare-x: {{stage: prepare, inputs: {{source: "
        f"{REPO / 'recipes/samples/lamini.jsonl'}}}, config: {{format: qa}}}}}}\n"
    )
    recipe = recipe_mod.load(tmp_path / "r.yaml")
    store = Store(str(tmp_path / "store"))
    path = tiny.ensure(store, "lfm2-350m", recipe)
    name = _name("lfm2-350m", recipe)
    first = store.read_manifest("_sources", name)
    assert tiny.ensure(store, "lfm2-350m", recipe) == path
    assert store.read_manifest("_sources", name)["timings"] == first["timings"], "reused, not rebuilt"
    pairs.write_text(pairs.read_text() + "sample-x\tGood night.\tتصبح على خير.\n", encoding="utf-8")
    changed = recipe_mod.load(tmp_path / "r.yaml")
    other = tiny.ensure(store, "lfm2-350m", changed)
    again = store.read_manifest("_sources", _name("lfm2-350m", changed))
    assert again["fingerprint"] != first["fingerprint"]
    # another spec is another folder: the first stand-in (which a step of another recipe may be reading) is
    # untouched
    assert _name("lfm2-350m", changed) != name and other != path
    assert store.read_manifest("_sources", name) == first
    store.verify_output("_sources", name, first, "model")
    weights = Path(other) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DataError, match="model.safetensors"):
        tiny.ensure(store, "lfm2-350m", changed)


def test_processes_side_by_side_build_once_and_commit_once(tmp_path: Path) -> None:
    """Compose services and test suites need the same stand-in at the same moment: one builds, the others wait
    for it, and the store gets one commit; another store then only copies it from the machine cache."""
    import os
    import subprocess
    import sys

    from helpers import events

    env = {**os.environ, "HALA_LOG_FORMAT": "json", "HALA_TINY_CACHE": str(tmp_path / "cache")}
    recipe = REPO / "recipes" / "tiny.yaml"

    def start(store: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hala.contract.tiny",
                "lfm2-350m",
                "--recipe",
                str(recipe),
                "--store",
                str(store),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    procs = [start(tmp_path / "store") for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    built = sum(1 for out, _ in outs for e in events(out) if e.get("event") == "tiny model built")
    assert built == 1
    store = Store(str(tmp_path / "store"))
    name = _name("lfm2-350m", recipe_mod.load(recipe))
    store.verify_output("_sources", name, store.read_manifest("_sources", name), "model")
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1
    other = start(tmp_path / "other-store")
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-2000:]
    # copied from the cache, not trained
    assert not any(e.get("event") == "tiny model built" for e in events(out))
