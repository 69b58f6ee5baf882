"""Runs for real: steps as subprocesses in their environments, committed atomically, cached, verified."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hala.contract import recipe as recipe_mod
from helpers import REPO, events, hala, manifest, output_dir, write_recipe

SAMPLES = REPO / "recipes" / "samples"


def _lamini(source: Path | str = SAMPLES / "lamini.jsonl", **config) -> dict:
    return {
        "stage": "prepare",
        "inputs": {"source": str(source)},
        "config": {
            "format": "columns",
            "columns": {"user": "instruction", "assistant": "response"},
            **config,
        },
    }


def _copy(upstream: str) -> dict:
    """A second prepare step that reads the first one's parquet output: a real downstream reader."""
    return {"stage": "prepare", "inputs": {"source": upstream}, "config": {"format": "messages"}}


@pytest.mark.slow
def test_tiny_recipe_runs_then_is_all_cached(tmp_path: Path) -> None:
    # CI runs `make run` first and points this at its store (HALA_TEST_TINY_STORE): the run is then checked,
    # not repeated; on its own the test runs the whole tiny recipe (a few minutes).
    store = Path(os.environ.get("HALA_TEST_TINY_STORE", tmp_path / "artifacts"))
    first = hala("run", "recipes/tiny.yaml", "--store", str(store))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    steps = [e["step"] for e in events(first.stdout) if e.get("event") == "summary"]
    planned = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())["steps"]
    assert steps and set(steps) == {n for n, s in planned.items() if s.get("enabled", True)}
    for step in (s for s in steps if s.startswith("prepare-")):
        m = manifest(store, "tiny", step)
        c = m["counts"]
        assert c["rows_in"] == c["rows_out"] + c["rows_quarantined"] + sum(c["rows_removed"].values())
        assert m["outputs"]["data"]["rows"] == c["rows_out"]
        assert m["quarantine"]["rows"] == c["rows_quarantined"]
        assert m["fingerprint"] and m["stage_version"] and m["code_version"]
        assert all(len(f["sha256"]) == 64 for f in m["outputs"]["data"]["files"])
    # the samples exercise every kind of accounting
    assert manifest(store, "tiny", "prepare-openorca")["counts"]["rows_removed"]["duplicates"] == 1
    assert manifest(store, "tiny", "prepare-openorca")["quarantine"]["by_reason"] == {"empty_turn": 1}
    assert manifest(store, "tiny", "prepare-hermes3")["counts"]["rows_removed"]["code"] == 2
    assert manifest(store, "tiny", "prepare-opus100")["quarantine"]["by_reason"] == {
        "empty_text": 1,
        "wrong_script": 1,
    }
    # model steps: the FP8 teacher carries its acceptance report, its folder says what it is
    # translate and judge: every row in the output or the quarantine; the teacher and the judge generate with
    # transformers (engine: transformers, seconds to start), the seven corpus translations send their requests
    # to the translator served once by vLLM's CPU build (served: translator); the serve suite runs the same
    # stages on vLLM in-process too
    users = recipe_mod.load(REPO / "recipes" / "tiny.yaml").served["translator"].users
    assert len(users) == 7
    for step in (s for s in steps if s.startswith(("translate-", "judge-"))):
        m = manifest(store, "tiny", step)
        c = m["counts"]
        assert c["rows_in"] == c["rows_out"] + c["rows_quarantined"] + sum(c["rows_removed"].values()), step
        assert c["rows_out"] > 0, step
        assert m["metrics"]["engines"] == (["endpoint"] if step in users else ["transformers"]), step
        if step in users:  # the server's own answer to /v1/models: the trained translator, by its name
            engine = m["metrics"]["engine"]
            assert (
                engine["served"]["id"] == "translator" and engine["requests"]["requests"] >= c["rows_in"]
            ), step
            assert engine["served"]["root"].endswith("tiny-lfm2-1.2b-SFT"), step
    assert manifest(store, "tiny", "translate-openorca-teacher")["shards"]["count"] == 2
    assert manifest(store, "tiny", "judge-opus100")["counts"]["rows_removed"]["rejected"] >= 1
    # train: the translator and the four Hala models, each with its loss curve; the student translations
    # and the merges consume what train committed; the three LFM2 stand-ins share one tokenized cache
    for step in (s for s in steps if s.startswith("train-")):
        m = manifest(store, "tiny", step)
        curve = m["metrics"]["loss_curve"]["train"]
        assert len(curve) >= 2 and curve[-1]["loss"] < curve[0]["loss"], step
        assert m["metrics"]["global_step"] == m["config"]["trainer"]["max_steps"], step
        assert m["metrics"]["sample"]["new_tokens"] > 0, step  # the committed folder loaded and generated
        assert m["outputs"]["model"]["path"].endswith("-SFT"), step
    assert manifest(store, "tiny", "translate-hermes3")["inputs"]["model"]["step"] == "train-translator"
    assert manifest(store, "tiny", "merge-hala-9b")["inputs"]["model"]["step"] == "train-hala-9b"
    caches = {
        manifest(store, "tiny", f"train-hala-{s}")["metrics"]["tokenized"]["cache"]
        for s in ("350m", "700m", "1.2b")
    }
    assert len(caches) == 1
    # evaluate: the FP8 check passed, the translator was scored against its base, the four Hala models on
    # every OALL v2 family (format-only data in the tiny recipe)
    fp8_check = manifest(store, "tiny", "evaluate-fp8-teacher")["metrics"]
    assert fp8_check["accepted"] and fp8_check["fp8"]["engine"]["engine"] == "transformers"
    assert {"model", "base", "difference"} <= set(manifest(store, "tiny", "evaluate-translator")["metrics"])
    for size in ("350m", "700m", "1.2b", "9b"):
        bench = manifest(store, "tiny", f"evaluate-hala-{size}")["metrics"]
        assert len(bench["model"]["families"]) == 6 and not bench["model"]["failures"], size
        assert (
            bench["data_origin"] == "format_only" and bench["model"]["input"]["step"] == f"merge-hala-{size}"
        )
    fp8 = manifest(store, "tiny", "quantize-teacher")
    assert fp8["outputs"]["model"]["path"] == f"attempt-{fp8['attempt']}/tiny-teacher-FP8-Dynamic"
    assert fp8["metrics"]["fidelity"]["ppl_increase"] <= fp8["config"]["max_ppl_increase"]
    assert fp8["inputs"]["model"]["kind"] == "tiny"
    assert (
        store / "_sources" / f"tiny-teacher-{fp8['inputs']['model']['sha256'][:16]}" / "_MANIFEST.json"
    ).exists()
    second = hala("run", "recipes/tiny.yaml", "--store", str(store))
    assert second.returncode == 0
    states = {e["step"]: e["state"] for e in events(second.stdout) if e.get("event") == "summary"}
    assert set(states.values()) == {"cached"}, states
    assert not any(e.get("event") == "start" for e in events(second.stdout)), (
        "a cached step must not start a process"
    )
    status = hala("status", "tiny", "--store", str(store), "--json")
    # publish-hala is off
    rows = [r for r in json.loads(status.stdout) if planned[r["step"]].get("enabled", True)]
    assert {r["state"] for r in rows} == {"committed"} and all(r["cached"] for r in rows)
    # publish, switched on (after the cache check: a disabled step is not part of a plain run); no token
    # here, so a dry run with a card per model (lineage and scores)
    pub = hala(
        "run",
        "recipes/tiny.yaml",
        "--store",
        str(store),
        "--only",
        "publish-hala",
        "--set",
        "publish-hala.enabled=true",
        env={"HF_TOKEN": ""},
    )
    assert pub.returncode == 0, pub.stdout[-3000:] + pub.stderr
    plan_dir = (
        store / "tiny" / "publish-hala" / manifest(store, "tiny", "publish-hala")["outputs"]["plan"]["path"]
    )
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert plan["mode"] == "dry-run" and len(plan["repos"]) == 6
    card = (plan_dir / next(r["card"] for r in plan["repos"] if r["input"] == "hala_9b")).read_text()
    assert "`train-hala-9b` (train" in card and "`evaluate-hala-9b`" in card and "format-only" in card


def test_cache_misses_on_config_input_and_force(tmp_path: Path) -> None:
    source = tmp_path / "lamini.jsonl"
    source.write_bytes((SAMPLES / "lamini.jsonl").read_bytes())
    path = write_recipe(
        tmp_path, {"prepare-lamini": _lamini(source), "prepare-copy": _copy("prepare-lamini")}
    )

    def states(*extra: str) -> dict[str, str]:
        result = hala("run", str(path), *extra)
        assert result.returncode == 0, result.stderr + result.stdout[-2000:]
        return {e["step"]: e["state"] for e in events(result.stdout) if e.get("event") == "summary"}

    assert states() == {"prepare-lamini": "done", "prepare-copy": "done"}
    assert states() == {"prepare-lamini": "cached", "prepare-copy": "cached"}
    # a config change reruns the step; its output is byte-identical, so the reader stays cached
    assert states("--set", "prepare-lamini.rows_per_file=1000") == {
        "prepare-lamini": "done",
        "prepare-copy": "cached",
    }
    # changed input content: both rerun (the copy's input hash changed)
    source.write_text(source.read_text() + json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
    assert states("--set", "prepare-lamini.rows_per_file=1000") == {
        "prepare-lamini": "done",
        "prepare-copy": "done",
    }
    assert states("--set", "prepare-lamini.rows_per_file=1000", "--force", "prepare-copy") == {
        "prepare-lamini": "cached",
        "prepare-copy": "done",
    }
    assert states("--set", "prepare-lamini.rows_per_file=1000", "--force") == {
        "prepare-lamini": "done",
        "prepare-copy": "done",
    }


def test_tampered_output_makes_the_next_reader_exit_3_naming_the_file(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": _lamini(), "prepare-copy": _copy("prepare-lamini")})
    assert hala("run", str(path)).returncode == 0
    store = tmp_path / "store"
    part = output_dir(store, "r", "prepare-lamini") / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    verify = hala("verify", "r", "--store", str(store))
    assert verify.returncode == 3
    assert str(part) in verify.stderr and "changed since it was written" in verify.stderr
    reader = hala("run", str(path), "--force", "prepare-copy", "--only", "prepare-copy")
    assert reader.returncode == 3
    failure = next(
        e for e in events(reader.stdout) if e.get("event") == "failed" and e.get("step") == "prepare-copy"
    )
    assert str(part) in failure["error"]


def test_a_killed_step_stays_invisible_and_a_rerun_commits_it(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        for i in range(400_000):
            f.write(json.dumps({"instruction": f"Question number {i}?", "response": f"Answer {i}."}) + "\n")
    path = write_recipe(tmp_path, {"prepare-big": _lamini(big), "prepare-copy": _copy("prepare-big")})
    store = tmp_path / "store"
    env = {**os.environ, "HALA_PROGRESS_EVERY": "0.2", "HALA_LOG_FORMAT": "json"}
    cmd = [sys.executable, "-m", "hala.ops.cli", "run", str(path), "--only", "prepare-big"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # kill the whole process group at the first progress event: mid-way through
        if '"event": "progress"' in line and '"final"' not in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    step_dir = store / "r" / "prepare-big"
    assert not (step_dir / "_MANIFEST.json").exists()
    assert list(step_dir.glob("attempt-*")), "the partial output stays in the attempt's own folder"
    downstream = hala("run", str(path), "--only", "prepare-copy")
    assert downstream.returncode == 2 and "not committed" in downstream.stderr
    status = json.loads(hala("status", "r", "--store", str(store), "--json").stdout)
    assert {r["step"]: r["state"] for r in status}["prepare-big"] == "running"
    rerun = hala("run", str(path))
    assert rerun.returncode == 0, rerun.stderr
    assert manifest(store, "r", "prepare-big")["counts"]["rows_out"] == 400_000
    assert not (step_dir / "_work").exists(), "work areas are removed at commit"
    # the killed attempt's folder is left beside the commit, never referenced, for `hala gc` to take
    attempts = sorted(p.name for p in step_dir.glob("attempt-*"))
    committed = manifest(store, "r", "prepare-big")["attempt"]
    assert len(attempts) == 2 and f"attempt-{committed}" in attempts
    listed = json.loads(hala("gc", "r", "--store", str(store), "--grace", "0", "--json").stdout)
    killed = next(a for a in attempts if a != f"attempt-{committed}")
    assert all(f"/prepare-big/{killed}/" in f["path"] for f in listed["files"]), listed
    assert hala("gc", "r", "--store", str(store), "--grace", "0", "--delete").returncode == 0
    assert [p.name for p in step_dir.glob("attempt-*")] == [f"attempt-{committed}"]
    assert hala("verify", "r", "--store", str(store)).returncode == 0


def test_stale_work_of_another_fingerprint_is_discarded(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": _lamini()})
    stale = tmp_path / "store" / "r" / "prepare-lamini" / "_work" / ("0" * 64)
    stale.mkdir(parents=True)
    (stale / "chunk-00000.parquet").write_bytes(b"old")
    assert hala("run", str(path)).returncode == 0
    assert not stale.exists()


def test_step_command_is_the_contract(tmp_path: Path) -> None:
    """`python -m stages.<stage>` in the stage's environment: exactly what compose and Kubernetes run."""
    path = write_recipe(tmp_path, {"prepare-lamini": _lamini()})
    py = REPO / ".venvs" / "data" / "bin" / "python"
    cmd = [str(py), "-m", "stages.prepare", "--recipe", str(path), "--step", "prepare-lamini"]
    first = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HALA_LOG_FORMAT": "json"})
    assert first.returncode == 0, first.stdout + first.stderr
    lines = events(first.stdout)
    assert all(
        {"run", "step", "stage"} <= set(e)
        for e in lines
        if e.get("logger", "").startswith(("hala.step", "stages."))
    )
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and any(e.get("event") == "cached" for e in events(again.stdout))
    wrong = subprocess.run(
        [str(py), "-m", "stages.prepare", "--recipe", str(path), "--step", "prepare-lamni"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "did you mean 'prepare-lamini'" in wrong.stdout


def test_memory_store_is_refused_by_the_runner(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": _lamini()}, store="memory://hala")
    result = hala("run", str(path))
    assert result.returncode == 2 and "memory://" in result.stderr


def test_run_records_logs_and_status(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"prepare-lamini": _lamini()})
    assert hala("run", str(path)).returncode == 0
    log = (tmp_path / "store" / "r" / "_logs" / "prepare-lamini.jsonl").read_text().splitlines()
    assert any(json.loads(line)["event"] == "committed" for line in log)
    table = hala("status", "r", "--store", str(tmp_path / "store"))
    assert "prepare-lamini" in table.stdout and "committed" in table.stdout and "data=4" in table.stdout
    assert hala("status", "nope", "--store", str(tmp_path / "store")).returncode == 2


def test_manifest_is_written_last(tmp_path: Path) -> None:
    """Every data file is older than (or as old as) the manifest: readers that see a manifest see complete
    data."""
    path = write_recipe(tmp_path, {"prepare-lamini": _lamini()})
    assert hala("run", str(path)).returncode == 0
    step = tmp_path / "store" / "r" / "prepare-lamini"
    m_time = (step / "_MANIFEST.json").stat().st_mtime_ns
    for f in manifest(tmp_path / "store", "r", "prepare-lamini")["outputs"]["data"]["files"]:
        assert (step / f["path"]).stat().st_mtime_ns <= m_time


@pytest.mark.slow
def test_the_run_report_opens_in_headless_chromium_with_its_tables_and_plots(tmp_path: Path) -> None:
    """The page a person opens after `make run`: rendered by a real browser, its tables and plots there."""
    store = Path(os.environ.get("HALA_TEST_TINY_STORE", tmp_path / "artifacts"))
    if not (store / "tiny" / "_RUN.json").exists():
        assert hala("run", "recipes/tiny.yaml", "--store", str(store)).returncode == 0
    out = tmp_path / "report"
    result = hala("report", "tiny", "--store", str(store), "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = out / "report.html"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| train-translator | train | committed |" in md and "paper: Hala-9B" in md
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is missing: `make test` installs Debian's chromium package"
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for table in ("steps", "rows-left-out", "fp8-acceptance", "translation-quality", "arabic-benchmarks"):
        assert f'id="{table}"' in dom.stdout, table
    assert dom.stdout.count('src="data:image/png;base64,') == 4  # loss curves, generation, training, reasons
    assert (
        "Generation throughput per step (engine start-up excluded)" in dom.stdout
        and "Training throughput per step" in dom.stdout
    )
    for name in (
        "translate-openorca-teacher",
        "translate-openorca",
    ):  # the rate the plot shows leaves the engine's start out
        m = json.loads((store / "tiny" / name / "_MANIFEST.json").read_text())
        shards = m["metrics"].get("shards") or [m["metrics"]]
        assert all(0 < s["generation_seconds"] < m["timings"]["seconds"] for s in shards), name
    assert "evaluate-hala-9b" in dom.stdout and "Hala-9B" in dom.stdout
    # the plots are drawn, not just referenced: the screenshot holds the bar colours of two of them
    shot = tmp_path / "page.png"
    run = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1400,9000", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    from PIL import Image

    colours = {c for _, c in Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (0x4A, 0x7B, 0xB7) in colours and (0xC4, 0x60, 0x4F) in colours


def test_the_report_draws_its_plots_again_only_when_a_manifest_changed(tmp_path: Path) -> None:
    """A cached rerun's report reuses its plots (issue 30: drawing them was most of a cached `make run`):
    keyed by the manifests, this module's code and matplotlib's version; a changed manifest draws them
    again."""
    store = Path(os.environ.get("HALA_TEST_TINY_STORE", tmp_path / "artifacts"))
    if not (store / "tiny" / "_RUN.json").exists():
        assert hala("run", "recipes/tiny.yaml", "--store", str(store)).returncode == 0
    out = tmp_path / "report"
    code = (
        "import sys\n"
        "from hala.contract.store import Store\n"
        "from hala.ops import report\n"
        f"report.write(Store({str(store)!r}), 'tiny', {str(out)!r})\n"
        "print('matplotlib' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and first.stdout.strip() == "True", first.stderr[-2000:]
    saved = json.loads((out / "plots.json").read_text())
    page = (out / "report.html").read_text()
    assert len(saved["plots"]) == 4 and all(png in page for _, png in saved["plots"])
    stamp = (out / "plots.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "False", again.stderr[-2000:]  # nothing drawn
    assert (out / "plots.json").stat().st_mtime_ns == stamp and (out / "report.html").read_text() == page

    import fsspec

    from hala.contract.store import Store
    from hala.ops import report

    data = report.collect(Store(str(store)), "tiny")
    name = next(n for n, m in data["manifests"].items() if m and "loss_curve" in (m.get("metrics") or {}))
    data["manifests"][name]["metrics"]["loss_curve"]["train"][-1]["loss"] += 1.0  # a step that ran again
    images = report.cached_plots(fsspec.filesystem("file"), str(out), data)
    assert json.loads((out / "plots.json").read_text())["key"] != saved["key"]
    assert images[0][1] != saved["plots"][0][1]  # the loss curves, drawn again with the new point
