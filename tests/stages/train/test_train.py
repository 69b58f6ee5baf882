"""train on the tiny stand-ins: real TRL SFTTrainer, real checkpoints, real resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hala.contract import schema, step, tables, tiny
from hala.contract.store import Store
from helpers import REPO, events, output_dir, write_recipe
from stages.train import data, launch
from stages.train import main as tmain
from stages.train.config import TrainConfig

PAIRS = REPO / "recipes" / "samples" / "pairs.en-ar.tsv"
PROMPT = "Translate everything that follows into Arabic:\n\n{text}"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the session: each tiny base is built once, in <store>/_sources/."""
    return tmp_path_factory.mktemp("store")


def write_pairs(folder: Path, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tables.write(str(folder / "part-00000.parquet"), rows, tables.pairs_schema())
    return folder


def write_chats(folder: Path, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    full = [
        {
            "id": r["id"],
            "origin": "t",
            "messages": [{"tool_calls": None, **m} for m in r["messages"]],
            "tools": r.get("tools"),
        }
        for r in rows
    ]
    tables.write(str(folder / "part-00000.parquet"), full, tables.conversations_schema())
    return folder


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [
        {"id": f"p:{i}", "origin": "s", "src_lang": "en", "tgt_lang": "ar", "src": en, "tgt": ar}
        for i, (en, ar) in enumerate(tiny.read_pairs(PAIRS))
    ]
    return write_pairs(tmp_path_factory.mktemp("pairs") / "data", rows)


@pytest.fixture(scope="session")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Arabic chats from the sample pairs (one and two exchanges), plus the rows train must refuse."""
    ps = tiny.read_pairs(PAIRS)
    rows = []
    for i in range(0, 40, 2):
        (q1, a1), (q2, a2) = ps[i], ps[i + 1]
        msgs = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
        if i % 4 == 0:
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"id": f"c:{i}", "messages": msgs})
    rows.append({"id": "bad:no-assistant", "messages": [{"role": "user", "content": "مرحبا"}]})
    rows.append(
        {
            "id": "bad:empty",
            "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "نعم"}],
        }
    )
    return write_chats(tmp_path_factory.mktemp("chats") / "data", rows)


def train(
    tmp_path: Path, store: Path, run: str, inputs: dict[str, str], **config: Any
) -> tuple[int, dict | None]:
    path = write_recipe(
        tmp_path,
        {"train-x": {"stage": "train", "inputs": inputs, "config": config}},
        store=str(store),
        run=run,
        tiny_models={"pairs": str(PAIRS)},
    )
    code = step.run("train", TrainConfig, tmain.main, argv=["--recipe", str(path), "--step", "train-x"])
    return code, Store(str(store)).read_manifest(run, "train-x")


FAST = {
    "max_steps": 30,
    "learning_rate": 3.0e-3,
    "per_device_train_batch_size": 8,
    "max_length": 128,
    "logging_steps": 5,
    "save_steps": 15,
    "lr_scheduler_type": "constant",
}


def test_schema_file_matches_the_typed_config() -> None:
    assert schema.check("train") is None


# --- labels: what the loss sees ----------------------------------------------------------------------------


def _tok(store: Path, tmp_path: Path, role: str = "lfm2-350m") -> Any:
    return AutoTokenizer.from_pretrained(tiny.ensure(Store(str(store)), role, _recipe(tmp_path, store)))


def test_pairs_train_on_the_translation_only(store: Path, tmp_path: Path) -> None:
    tok = _tok(store, tmp_path)
    item = {
        "example": json.dumps(
            {
                "prompt": [{"role": "user", "content": PROMPT.replace("{text}", "Good morning.")}],
                "completion": [{"role": "assistant", "content": "صباح الخير."}],
            }
        )
    }
    out = data.tokenize(item, tok, tok.chat_template, "pairs")
    trained = [t for t, lab in zip(out["input_ids"], out["labels"]) if lab != -100]
    assert tok.decode(trained) == "صباح الخير.<|im_end|>\n"
    assert out["labels"][: len(out["labels"]) - len(trained)] == [-100] * (len(out["labels"]) - len(trained))


def test_conversations_train_on_assistant_turns_only(store: Path, tmp_path: Path) -> None:
    tok = _tok(store, tmp_path)
    chat = [
        {"role": "system", "content": "أنت مساعد مفيد."},
        {"role": "user", "content": "ما عاصمة مصر؟"},
        {"role": "assistant", "content": "القاهرة."},
        {"role": "user", "content": "وفرنسا؟"},
        {"role": "assistant", "content": "باريس."},
    ]
    out = data.tokenize({"example": json.dumps({"messages": chat})}, tok, tok.chat_template, "conversations")
    spans, cur = [], []
    for t, lab in zip(out["input_ids"], out["labels"]):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans += [tok.decode(cur)] if cur else []
    assert spans == ["القاهرة.<|im_end|>", "باريس.<|im_end|>"]


def test_masked_forms_teach_the_translator_to_carry_markers(tmp_path: Path) -> None:
    cfg = TrainConfig(task="pairs", prompt=PROMPT)
    out = data.Examples()
    rows = [
        {
            "id": "a",
            "src_lang": "en",
            "tgt_lang": "ar",
            "src": "Compute $x^2$ now.",
            "tgt": "احسب $x^2$ الآن.",
        },
        {"id": "b", "src_lang": "ar", "tgt_lang": "en", "src": "شكرا", "tgt": "Thanks"},
        {"id": "c", "src_lang": "fr", "tgt_lang": "ar", "src": "Merci", "tgt": "شكرا"},
        {"id": "d", "src_lang": "en", "tgt_lang": "ar", "src": "Hi", "tgt": " "},
    ]
    data.add_pairs(out, "p", rows, cfg)
    # written to Arrow as they are made, read back mapped
    made = [json.loads(e) for e in out.dataset()["example"]]
    completions = [e["completion"][0]["content"] for e in made]
    prompts = [e["prompt"][0]["content"] for e in made]
    assert completions == ["احسب $x^2$ الآن.", "احسب ⟦0⟧ الآن.", "شكرا"]  # b is flipped to en-ar
    assert prompts[1].endswith("Compute ⟦0⟧ now.") and prompts[2].endswith("Thanks")
    assert out.augmented == 1
    assert [(q["id"], q["reason"]) for q in out.quarantine] == [
        ("c", "unsupported_direction"),
        ("d", "empty_pair"),
    ]


# --- whole steps -------------------------------------------------------------------------------------------


def test_translator_step_trains_saves_a_loadable_model_with_card_and_curve(
    store: Path, tmp_path: Path, pairs: Path
) -> None:
    code, m = train(
        tmp_path,
        store,
        "translator",
        {"model": "tiny:lfm2-1.2b", "pairs": str(pairs)},
        task="pairs",
        prompt=PROMPT,
        trainer=FAST,
    )
    assert code == 0
    out = store / "translator" / "train-x" / m["outputs"]["model"]["path"]
    assert out.name == "tiny-lfm2-1.2b-SFT"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
        "training_log.jsonl",
    ):
        assert (out / name).exists(), name
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    card = (out / "README.md").read_text()
    assert "base_model: tiny:lfm2-1.2b" in card and m["inputs"]["pairs"]["sha256"][:16] in card
    mm = m["metrics"]
    curve = mm["loss_curve"]["train"]
    assert [p["step"] for p in curve] == [5, 10, 15, 20, 25, 30]
    assert curve[-1]["loss"] < 0.7 * curve[0]["loss"], curve
    assert mm["global_step"] == 30 and mm["tokens_trained"] > 0 and mm["train_tokens_per_second"] > 0
    assert m["counts"] == {"rows_in": 77, "rows_out": 77, "rows_quarantined": 0, "rows_removed": {}}
    assert mm["tokenized"]["examples_augmented"] > 0  # the sample pairs with LaTeX/code spans
    assert mm["sample"]["output"].strip() and mm["sample"]["new_tokens"] > 0
    # the way a consumer loads it
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT.replace("{text}", "Good morning.")}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_tokenized_cache_is_shared_by_steps_with_the_same_tokenizer_and_data(
    store: Path, tmp_path: Path, chats: Path
) -> None:
    common = {"task": "conversations", "trainer": {**FAST, "max_steps": 4, "save_steps": 100}}
    code, first = train(
        tmp_path / "a", store, "cache", {"model": "tiny:lfm2-350m", "chats": str(chats)}, **common
    )
    assert code == 0 and first["metrics"]["tokenized"]["hit"] is False
    # another base with the same tokenizer (the three LFM2 Hala models) and another learning rate
    common["trainer"]["learning_rate"] = 1.0e-3
    code, second = train(
        tmp_path / "b", store, "cache2", {"model": "tiny:lfm2-700m", "chats": str(chats)}, **common
    )
    assert code == 0 and second["metrics"]["tokenized"]["hit"] is True
    assert second["metrics"]["tokenized"]["cache"] == first["metrics"]["tokenized"]["cache"]
    # quarantine and counts come with the cache
    assert (
        second["counts"]
        == first["counts"]
        == {"rows_in": 22, "rows_out": 20, "rows_quarantined": 2, "rows_removed": {}}
    )
    assert second["quarantine"]["by_reason"] == {"empty_turn": 1, "no_assistant_turn": 1}
    q = pq.read_table(output_dir(store, "cache2", "train-x", "quarantine")).to_pylist()
    assert sorted((r["id"], r["reason"]) for r in q) == [
        ("bad:empty", "empty_turn"),
        ("bad:no-assistant", "no_assistant_turn"),
    ]


def test_gemma2_conversations_with_packing_eval_split_and_mixture(
    store: Path, tmp_path: Path, chats: Path, pairs: Path
) -> None:
    # the same chats twice under two names, weighted 2.0 and 0.5
    code, m = train(
        tmp_path,
        store,
        "gemma",
        {"model": "tiny:fanar-9b", "a": str(chats), "b": str(chats)},
        task="conversations",
        mixture={"a": 2.0, "b": 0.5},
        eval_fraction=0.1,
        trainer={**FAST, "max_steps": 10, "packing": True, "eval_steps": 5},
    )
    assert code == 0, m
    t = m["metrics"]["tokenized"]
    assert t["rows_eval"] == 4  # 2 of each input's 20 usable rows
    assert t["rows_per_input_after_mixture"] == {"a": 36, "b": 9}
    assert t["rows_sampled_out"] == 9
    assert t["sequences_train"] < t["examples_train"]  # packed
    assert m["counts"]["rows_removed"] == {"mixture_sampled_out": 9}
    assert m["metrics"]["eval_loss"] > 0 and m["metrics"]["loss_curve"]["eval"]
    out = store / "gemma" / "train-x" / m["outputs"]["model"]["path"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma2"


def test_too_long_rows_are_dropped_or_truncated_and_counted(store: Path, tmp_path: Path, chats: Path) -> None:
    code, m = train(
        tmp_path / "drop",
        store,
        "long-drop",
        {"model": "tiny:lfm2-350m", "chats": str(chats)},
        task="conversations",
        too_long="drop",
        trainer={**FAST, "max_steps": 2, "max_length": 40},
    )
    assert code == 0
    dropped = m["quarantine"]["by_reason"]["too_long"]
    assert dropped > 0 and m["counts"]["rows_out"] == 20 - dropped
    code, m = train(
        tmp_path / "cut",
        store,
        "long-cut",
        {"model": "tiny:lfm2-350m", "chats": str(chats)},
        task="conversations",
        trainer={**FAST, "max_steps": 2, "max_length": 40},
    )
    assert code == 0
    assert m["metrics"]["tokenized"]["examples_truncated"] == dropped
    assert (
        "too_long" not in m["quarantine"]["by_reason"] or m["quarantine"]["by_reason"]["too_long"] < dropped
    )


def test_inputs_with_no_usable_row_stop_with_a_clear_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A judge that accepted nothing (an empty table) and rows that are all refused: the step names both
    inputs' rows and the reasons, exits 3 (bad data), and commits nothing (a real 135M judge rejected every
    pair)."""
    empty = write_chats(tmp_path / "empty", [])
    bad = write_chats(tmp_path / "bad", [{"id": "b", "messages": [{"role": "user", "content": "مرحبا"}]}])
    code, m = train(
        tmp_path,
        store,
        "nothing",
        {"model": "tiny:lfm2-350m", "accepted": str(empty), "chats": str(bad)},
        task="conversations",
        trainer={**FAST, "max_steps": 2},
    )
    said = capsys.readouterr().out + capsys.readouterr().err
    assert code == 3 and m is None
    assert "no example to train on" in said and "'accepted': 0" in said and "'chats': 1" in said, said[-2000:]


def test_lora_is_merged_into_a_plain_model(store: Path, tmp_path: Path, pairs: Path) -> None:
    code, m = train(
        tmp_path,
        store,
        "lora",
        {"model": "tiny:lfm2-350m", "pairs": str(pairs)},
        task="pairs",
        prompt=PROMPT,
        lora={"r": 4, "alpha": 8},
        save_dtype="float32",
        trainer={**FAST, "max_steps": 6},
    )
    assert code == 0
    out = store / "lora" / "train-x" / m["outputs"]["model"]["path"]
    assert out.name == "tiny-lfm2-350m-SFT-LoRA" and not (out / "adapter_config.json").exists()
    merged = load_file(out / "model.safetensors")
    # a tiny stand-in under _sources/: its manifest names the folder
    base_dir = Path(m["metrics"]["base"]["uri"])
    base = load_file(
        output_dir(base_dir.parents[1], "_sources", base_dir.name, "model") / "model.safetensors"
    )
    assert not any("lora" in k for k in merged) and set(merged) == set(base)
    changed = [k for k in base if not torch.equal(merged[k].float(), base[k].float())]
    assert any("proj" in k for k in changed) and all("embed" not in k for k in changed)


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_settings_fail_with_exit_2_naming_the_setting(
    store: Path, tmp_path: Path, pairs: Path, chats: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a tokenizer without a pad token
    src = Path(tiny.ensure(Store(str(store)), "lfm2-350m", _recipe(tmp_path, store)))
    nopad = tmp_path / "nopad"
    _copy_model(src, nopad, lambda cfg: {**cfg, "pad_token": None})
    code, _ = train(
        tmp_path / "a",
        store,
        "bad",
        {"model": str(nopad), "pairs": str(pairs)},
        task="pairs",
        prompt=PROMPT,
        trainer=FAST,
    )
    assert code == 2 and "trainer.pad_token" in capsys.readouterr().out
    # a template without {% generation %} markers that TRL cannot patch, for assistant-only loss
    plain = tmp_path / "plain"
    _copy_model(
        src,
        plain,
        None,
        template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
        "endfor %}",
    )
    code, _ = train(
        tmp_path / "b",
        store,
        "bad",
        {"model": str(plain), "chats": str(chats)},
        task="conversations",
        trainer=FAST,
    )
    assert code == 2 and "chat_template" in capsys.readouterr().out
    # pairs given to a conversations step
    code, _ = train(
        tmp_path / "c",
        store,
        "bad",
        {"model": "tiny:lfm2-350m", "pairs": str(pairs)},
        task="conversations",
        trainer=FAST,
    )
    assert code == 3 and "input 'pairs'" in capsys.readouterr().out
    # a mixture naming an input the step does not have
    code, _ = train(
        tmp_path / "d",
        store,
        "bad",
        {"model": "tiny:lfm2-350m", "pairs": str(pairs)},
        task="pairs",
        prompt=PROMPT,
        mixture={"pairs": 1.0, "opus": 1.0},
        trainer=FAST,
    )
    assert code == 2 and "opus" in capsys.readouterr().out


def test_a_misspelt_trainer_key_fails_when_the_recipe_loads(tmp_path: Path) -> None:
    from hala.contract import recipe as recipe_mod
    from hala.contract.errors import ConfigError

    path = write_recipe(
        tmp_path,
        {
            "train-x": {
                "stage": "train",
                "inputs": {"model": "hub:a/b", "d": "x"},
                "config": {"task": "pairs", "prompt": PROMPT, "trainer": {"learning_rte": 1e-5}},
            }
        },
    )
    with pytest.raises(
        ConfigError,
        match="unknown key 'learning_rte' in config.trainer \\(did you mean 'learning_rate'\\?\\)",
    ):
        recipe_mod.load(str(path))
    with pytest.raises(ValueError, match="output_dir: set by the stage"):
        TrainConfig(task="pairs", prompt=PROMPT, trainer={"output_dir": "/tmp/x"})


def _recipe(tmp_path: Path, store: Path) -> Any:
    from hala.contract import recipe as recipe_mod

    steps = {
        "prepare-x": {"stage": "prepare", "inputs": {"source": str(PAIRS)}, "config": {"format": "pairs"}}
    }
    return recipe_mod.load(
        str(write_recipe(tmp_path / "r", steps, store=str(store), tiny_models={"pairs": str(PAIRS)}))
    )


def _copy_model(src: Path, dst: Path, edit_tok: Any, template: str | None = None) -> None:
    import shutil

    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if edit_tok:
        cfg = edit_tok(cfg)
    path.write_text(json.dumps(cfg))
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)


# --- multi-GPU launch --------------------------------------------------------------------------------------


def test_multi_gpu_steps_relaunch_under_accelerate_with_the_shipped_config(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = write_recipe(
        tmp_path,
        {
            "train-x": {
                "stage": "train",
                "inputs": {"model": "hub:a/b", "d": str(tmp_path)},
                "config": {"task": "conversations", "accelerate": "fsdp", "processes": 8},
            }
        },
    )
    argv = ["--recipe", str(path), "--step", "train-x"]
    cmd = launch.plan(argv, gpus=8)
    assert cmd is not None and cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert (
        cmd[4].endswith("accelerate/fsdp.yaml") and cmd[5:7] == ["--num_processes", "8"] and cmd[-4:] == argv
    )
    assert launch.plan(argv, gpus=0) is None  # a laptop: one process
    assert launch.plan(argv + ["--set", "train-x.processes=1"], gpus=8) is None
    for name, kind in (("ddp", "MULTI_GPU"), ("fsdp", "FSDP")):
        config = load_config_from_file(str(launch.CONFIGS / f"{name}.yaml"))
        assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    assert load_config_from_file(str(launch.CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2


# --- resume after SIGKILL ----------------------------------------------------------------------------------


def _step_command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--recipe", str(recipe), "--step", "train-x"]


def test_sigkill_after_a_checkpoint_resumes_from_it_and_ends_where_an_uninterrupted_run_ends(
    store: Path, tmp_path: Path, pairs: Path
) -> None:
    config = {
        "task": "pairs",
        "prompt": PROMPT,
        "save_dtype": "float32",
        "trainer": {**FAST, "max_steps": 60, "save_steps": 10, "bf16": False},
    }
    inputs = {"model": "tiny:lfm2-350m", "pairs": str(pairs)}
    env = {**os.environ, "HALA_LOG_FORMAT": "json", "HALA_PROGRESS_BAR": "0"}

    killed = write_recipe(
        tmp_path / "k",
        {"train-x": {"stage": "train", "inputs": inputs, "config": config}},
        store=str(store),
        run="killed",
        tiny_models={"pairs": str(PAIRS)},
    )
    proc = subprocess.Popen(
        _step_command(killed), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    saved = None
    assert proc.stdout is not None
    for line in proc.stdout:
        ev = next(iter(events(line)), {})
        if ev.get("event") == "checkpoint saved":
            saved = ev["global_step"]
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert saved is not None and proc.returncode == -signal.SIGKILL
    assert Store(str(store)).read_manifest("killed", "train-x") is None  # nothing committed

    again = subprocess.run(
        _step_command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:]
    resumed = [e for e in events(again.stdout) if e.get("event") == "resuming"]
    assert resumed and resumed[0]["global_step"] >= saved
    m = Store(str(store)).read_manifest("killed", "train-x")
    assert m["metrics"]["resumed_from_step"] >= saved and m["metrics"]["global_step"] == 60
    first_logged = min(p["step"] for p in m["metrics"]["loss_curve"]["train"])
    assert first_logged == FAST["logging_steps"]  # the curve keeps the steps before the kill

    whole = write_recipe(
        tmp_path / "w",
        {"train-x": {"stage": "train", "inputs": inputs, "config": config}},
        store=str(store),
        run="whole",
        tiny_models={"pairs": str(PAIRS)},
    )
    ref = subprocess.run(_step_command(whole), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:]
    mw = Store(str(store)).read_manifest("whole", "train-x")
    a = load_file(store / "killed" / "train-x" / m["outputs"]["model"]["path"] / "model.safetensors")
    b = load_file(store / "whole" / "train-x" / mw["outputs"]["model"]["path"] / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert abs(m["metrics"]["final_loss"] - mw["metrics"]["final_loss"]) <= 1e-4


def test_gpu_benchmark_script_runs_its_smoke_mode_on_cpu() -> None:
    """bench/gpu_train.py waits for a lent GPU; its smoke mode keeps the script itself working meanwhile."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_train.py"), "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert report["timed_steps"] == 3 and report["tokens_per_s"] > 0 and report["goal_mfu"] == 0.40


def test_object_store_checkpoints_are_uploaded_marked_and_resumed_from(tmp_path: Path) -> None:
    """memory:// stands in for s3://: checkpoints are written locally, uploaded with their marker, and a
    fresh machine (a new Area) downloads the newest complete one; one without a marker is deleted."""
    from types import SimpleNamespace

    from stages.train import checkpoints

    st = Store("memory://ckpt-store")
    work = st.path("r", "train-x", "_work", "f" * 64)
    area = checkpoints.Area(st, work)
    mark = checkpoints.Mark(area, __import__("structlog").get_logger())
    args = SimpleNamespace(output_dir=area.dir)
    for step_no in (10, 20):
        ckpt = Path(area.dir) / f"checkpoint-{step_no}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step_no}))
        mark.on_save(args, SimpleNamespace(is_world_process_zero=True, global_step=step_no), None)
    st.fs.pipe(f"{work}/checkpoints/checkpoint-30/trainer_state.json", b"{}")  # cut by a kill: no marker
    assert st.fs.exists(f"{work}/checkpoints/checkpoint-20/{checkpoints.MARK}")

    fresh = checkpoints.Area(st, work)
    local, step_no = fresh.latest()
    assert step_no == 20 and local.startswith(fresh.dir)
    assert json.loads((Path(local) / "trainer_state.json").read_text()) == {"global_step": 20}
    assert not st.fs.exists(f"{work}/checkpoints/checkpoint-30")
    checkpoints.cleanup(area)
    checkpoints.cleanup(fresh)


def test_a_step_on_an_object_store_trains_and_commits(tmp_path: Path, pairs: Path) -> None:
    code, m = train(
        tmp_path,
        "memory://train-store",
        "obj",
        {"model": "tiny:lfm2-350m", "pairs": str(pairs)},  # type: ignore[arg-type]
        task="pairs",
        prompt=PROMPT,
        trainer={**FAST, "max_steps": 4, "save_steps": 2},
    )
    assert code == 0
    st = Store("memory://train-store")
    files = st.fs.ls(st.path("obj", "train-x", m["outputs"]["model"]["path"]), detail=False)
    assert any(f.endswith("model.safetensors") for f in files)
    assert st.fs.exists(st.path(m["metrics"]["tokenized"]["cache"], "_MANIFEST.json"))
    assert not st.fs.exists(st.path("obj", "train-x", "_work"))  # checkpoints leave with the commit
