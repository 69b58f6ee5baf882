"""Paper scale on this machine: the data plane of prepare -> translate (S shards) -> gather -> judge (S
shards) -> gather at N rows, each step a process of its own stage environment, as `hala run` starts them. The
model is the instant engine (HALA_BENCH_ENGINE=instant, hala.kit.engine.InstantEngine): it answers at once, so
what is measured is the stages' own work (read the shard's rows, plan, protect spans, gate, write, commit),
never a model.

    .venvs/cli/bin/python bench/scale.py --rows 10000 100000 1000000 --shards 2 8 [--out bench/scale.json]

Rows are synthesized from the real rows of ../shared/data in the shares of an instruction mixture: Alpaca
(single turn), GSM8K (arithmetic with <<...>> annotations), LIMA (long answers), glaive tool-call chats
(multi-turn), GPTeacher codegen (code blocks) and MATH-500 (LaTeX). Each row gets a serial number in its first
turn, so exact dedup keeps every one. Shards run one after another (one core each, as one pod each would): a
shard's rows/s is its own, the step's is N over the sum of its shards' seconds. Peak RSS is that of the step's
process (each step runs alone, in a fresh wrapper that reads RUSAGE_CHILDREN), files are those its manifest
lists.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("HALA_SHARED_DATA", REPO.parent / "shared" / "data"))
VENVS = REPO / ".venvs"
LANGUAGE_ID = True
CHUNK_ROWS = 2048  # translate's; --chunk-rows


def _load(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    return (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )


def pools() -> dict[str, list[list[dict[str, str]]]]:
    """Conversations (user/assistant turns) from the real rows, by source."""
    alpaca = [
        [
            {"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""))},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in _load(DATA / "en-alpaca-5000" / "alpaca_5000.json")
    ]
    gsm8k = [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for r in _load(DATA / "en-gsm8k" / "train.jsonl")
    ]
    lima = []
    for r in _load(DATA / "en-lima" / "lima.json"):
        turns = r.get("conversations") or [r.get("instruction", ""), r.get("output", "")]
        lima.append(
            [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns) if t]
        )
    glaive = []
    for r in _load(DATA / "en-glaive-toolcall-demo" / "glaive_toolcall_en_demo.json"):
        turns = [t for t in r["conversations"] if t["from"] in ("human", "gpt")]
        msgs = [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns
        ]
        if msgs and msgs[0]["role"] == "user":
            glaive.append(msgs)
    code = [
        [
            {"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")},
            {"role": "assistant", "content": r["response"]},
        ]
        for r in _load(DATA / "en-gpteacher-codegen" / "codegen-instruct.json")
    ]
    math = [
        [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]
        for r in _load(DATA / "en-math500" / "test_ori.jsonl")
    ]
    return {"alpaca": alpaca, "gsm8k": gsm8k, "lima": lima, "glaive": glaive, "code": code, "math": math}


SHARES = {"alpaca": 0.55, "gsm8k": 0.15, "lima": 0.05, "glaive": 0.15, "code": 0.05, "math": 0.05}


def synthesize(n: int, path: Path, seed: int = 0) -> None:
    """n rows of {"messages": [...]} drawn by SHARES, each first turn numbered (dedup keeps it): JSON lines,
    or one JSON array when the path ends in .json (prepare's streaming parser)."""
    rng = random.Random(seed)
    sources = pools()
    names, weights = list(SHARES), list(SHARES.values())
    array = path.suffix == ".json"
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n" if array else "")
        for i in range(n):
            msgs = rng.choice(sources[rng.choices(names, weights)[0]])
            first = {**msgs[0], "content": f"({i}) {msgs[0]['content']}"}
            sep = ("," if i else " ") if array else ""
            f.write(sep + json.dumps({"messages": [first, *msgs[1:]]}, ensure_ascii=False) + "\n")
        f.write("]\n" if array else "")


def synthesize_alpaca(n: int, path: Path) -> None:
    """n rows in Alpaca's own format (instruction, input, output), the 5,000 real rows over and over, each
    instruction numbered: the rows the issue's 40K rows/s figure was measured on (format: alpaca)."""
    rows = _load(DATA / "en-alpaca-5000" / "alpaca_5000.json")
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            r = rows[i % len(rows)]
            f.write(json.dumps({**r, "instruction": f"({i}) {r['instruction']}"}, ensure_ascii=False) + "\n")


def _label(source: Path) -> str:
    return (
        "prepare (Alpaca rows)"
        if "alpaca" in source.name
        else "prepare (JSON array)"
        if source.suffix == ".json"
        else "prepare"
    )


def recipe(folder: Path, store: Path, run: str, source: Path, shards: int) -> Path:
    """One store for every run: the tiny stand-in's tokenizer is built once. The judge reads the translator's
    tokenizer too: the instant engine loads no weights, and the judge stand-in would cost a minute to
    train."""
    import yaml

    body = {
        "name": "scale",
        "store": str(store),
        "run": run,
        "tiny_models": {"pairs": str(REPO / "recipes" / "samples" / "pairs.en-ar.tsv")},
        "steps": {
            "prepare-mix": {
                "stage": "prepare",
                "inputs": {"source": str(source)},
                "config": {"format": "alpaca" if "alpaca" in source.name else "messages", "drop_code": False},
            },
            "translate-mix": {
                "stage": "translate",
                "shards": shards,
                "inputs": {"data": "prepare-mix", "model": "tiny:translator"},
                "config": {
                    "engine": "transformers",
                    "max_model_len": 4096,
                    "unit": "paragraph",
                    "sampling": {"max_tokens": 2048},
                    "outputs": ["conversations", "pairs"],
                    "chunk_rows": CHUNK_ROWS,
                    # --no-language-id: the gate without identification, to measure its share
                    "gate": {"language_id": {"enabled": LANGUAGE_ID}},
                },
            },
            "judge-mix": {
                "stage": "judge",
                "shards": shards,
                "inputs": {"data": "translate-mix.pairs", "model": "tiny:translator"},
                "config": {"engine": "transformers", "max_model_len": 8192, "chunk_rows": 4096},
            },
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


# Peak RSS (ru_maxrss) counts the pages of memory-mapped files the process touched (datasets' Arrow files:
# train's tokenized table); RssAnon, sampled from /proc every 0.1 s, is the memory the process itself holds.
WRAP = (
    "import resource, subprocess, sys, time, tempfile\n"
    "t = time.perf_counter()\n"
    "err = tempfile.TemporaryFile()\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=err)\n"
    "anon = 0\n"
    "while p.poll() is None:\n"
    "    try:\n"
    "        for line in open(f'/proc/{p.pid}/status'):\n"
    "            if line.startswith('RssAnon:'): anon = max(anon, int(line.split()[1]))\n"
    "    except OSError: pass\n"
    "    time.sleep(0.1)\n"
    "err.seek(0); sys.stderr.write(err.read().decode()[-3000:])\n"
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, anon / "
    "1024, p.returncode)\n"
)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one command, in a fresh wrapper process; the peak of its anonymous memory
    is kept in ANON[-1] (MB)."""
    out = subprocess.run(
        [sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, env=env, cwd=REPO
    )
    seconds, rss, anon, rc = out.stdout.split()
    if rc != "0":
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({rc}): {out.stderr[-3000:]}")
    ANON.append(float(anon))
    return float(seconds), float(rss)


ANON: list[float] = []


def stage_cmd(env_name: str, stage: str, path: Path, step: str, shard: str | None = None) -> list[str]:
    cmd = [
        str(VENVS / env_name / "bin" / "python"),
        "-m",
        f"stages.{stage}",
        "--recipe",
        str(path),
        "--step",
        step,
    ]
    return cmd + (["--shard", shard] if shard else [])


def measure(
    n: int,
    shards: int,
    source: Path,
    folder: Path,
    store: Path,
    env: dict[str, str],
    judge: bool = True,
    prepare_only: bool = False,
    tokenize_rows: bool = False,
) -> Iterator[dict[str, Any]]:
    run = folder.name
    path = recipe(folder, store, run, source, shards)

    def manifest(_: Path, step: str) -> dict[str, Any]:
        return json.loads((store / run / step / "_MANIFEST.json").read_text())

    seconds, rss = timed(stage_cmd("data", "prepare", path, "prepare-mix"), env)
    m = manifest(folder, "prepare-mix")
    yield {
        "step": _label(source),
        "rows": n,
        "shards": 1,
        "rows_in": m["counts"]["rows_in"],
        "seconds": seconds,
        "rss_mb": rss,
        "anon_mb": ANON[-1],
        "files": len(m["outputs"]["data"]["files"]),
    }
    if prepare_only:
        return
    for step, stage in (("translate-mix", "translate"), ("judge-mix", "judge"))[: 2 if judge else 1]:
        per = [timed(stage_cmd("serve", stage, path, step, f"{i}/{shards}"), env) for i in range(shards)]
        shard_anon = max(ANON[-shards:])
        g_seconds, g_rss = timed(
            [str(VENVS / "cli" / "bin" / "python"), "-m", "hala.ops.cli", "gather", str(path), step], env
        )
        m = manifest(folder, step)
        c = m["counts"]
        assert c["rows_in"] == c["rows_out"] + c["rows_quarantined"] + sum(c["rows_removed"].values()), c
        shards_m = m["metrics"].get("shards") or [m["metrics"]]
        engine_start = max(s.get("engine", {}).get("start_seconds", 0) for s in shards_m)
        # the stage's own work: no imports, no engine start
        work = sum(s["generation_seconds"] for s in shards_m)
        # the output's folder as its manifest names it (inside the commit's attempt folder)
        out_dir = store / run / step / m["outputs"]["conversations"]["path"] if stage == "translate" else None
        extra = load_ratio(out_dir, env) if out_dir else {}
        if stage == "translate" and tokenize_rows:
            t = tokenize(store, run, env)
            yield {
                "step": "train tokenization",
                "rows": n,
                "shards": 1,
                "rows_in": m["outputs"]["conversations"]["rows"],
                "seconds": t["seconds"],
                "rss_mb": t["rss_mb"],
                "anon_mb": t["anon_mb"],
                "files": "-",
            }
        # with HALA_BENCH_TOKENS_PER_S the engine's sleeps: what a GPU at that rate would take
        rate = float(env.get("HALA_BENCH_TOKENS_PER_S") or 0)
        model = (
            sum(s.get("completion_tokens", 0) for s in shards_m) / rate
            if rate and stage == "translate"
            else 0
        )
        if model:
            extra = {**extra, "tokens_per_s": rate, "model_seconds": round(model, 2)}
        yield {
            **extra,
            "step": stage,
            "rows": n,
            "shards": shards,
            "rows_in": c["rows_in"],
            "seconds": sum(s for s, _ in per),
            "shard_seconds": [round(s, 2) for s, _ in per],
            "rss_mb": max(r for _, r in per),
            "anon_mb": shard_anon,
            "engine_start_s": engine_start,
            "work_seconds": round(work, 2),
            "gather_seconds": g_seconds,
            "gather_rss_mb": g_rss,
            "rows_quarantined": c["rows_quarantined"],
            "files": {o: len(e["files"]) for o, e in m["outputs"].items()},
        }


TOKENIZE = """
import glob, sys
from stages.train import data
from stages.train.config import TrainConfig
from hala.contract import tables
from transformers import AutoTokenizer
folder, model = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model)
reader = tables.RowGroups.local(folder)
examples = data.Examples()
examples.rows_in["mix"] = reader.total
data.add_conversations(examples, "mix", (row for _, row in reader.rows(0, reader.total)))
cfg = TrainConfig(task="conversations", eval_fraction=0.01)
p = data.prepare(examples, tok, None, cfg, 2048, "keep_start", False, "bfd", None)
counted = p.stats["rows_used"] + sum(p.stats["quarantine_by_reason"].values()) + p.stats["rows_eval"]
print(counted, p.stats["sequences_train"])
"""


def tokenize(store: Path, run: str, env: dict[str, str]) -> dict[str, Any]:
    """train's data path (stages.train.data: examples to Arrow, tokenize, too_long, eval split) on translate's
    output, with the translator stand-in's tokenizer and chat template, in the train environment."""
    model = store / "_sources" / "tiny-translator" / "model"
    cmd = [
        str(VENVS / "train" / "bin" / "python"),
        "-c",
        TOKENIZE,
        str(store / run / "translate-mix" / "conversations"),
        str(model),
    ]
    seconds, rss = timed(cmd, {**env, "HF_DATASETS_CACHE": str(store / "_hf")})
    return {"seconds": seconds, "rss_mb": rss, "anon_mb": ANON[-1]}


LOAD = """
import glob, sys, tempfile, time
import datasets, pyarrow.parquet as pq
folder = sys.argv[1]
files = sorted(glob.glob(folder + "/*.parquet"))
one = tempfile.mkdtemp() + "/one.parquet"
pq.write_table(pq.read_table(files), one, compression="zstd")  # the same rows, one file, pyarrow's defaults
datasets.disable_progress_bars()
def load(data_files):
    t = time.perf_counter()
    ds = datasets.load_dataset("parquet", data_files=data_files, split="train", cache_dir=tempfile.mkdtemp())
    return time.perf_counter() - t, ds.num_rows
(a, n), (b, m) = load(files), load([one])
assert n == m
print(a, b, n, len(files))
"""


def load_ratio(folder: Path, env: dict[str, str]) -> dict[str, float]:
    """datasets.load_dataset("parquet") of a committed output against the same rows written as one file."""
    out = subprocess.run(
        [str(VENVS / "data" / "bin" / "python"), "-c", LOAD, str(folder)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode:
        sys.exit(f"load_dataset failed: {out.stderr[-2000:]}")
    committed, single, rows, files = out.stdout.split()
    return {
        "load_committed_s": round(float(committed), 2),
        "load_one_file_s": round(float(single), 2),
        "load_ratio": round(float(single) / float(committed), 3),
        "load_files": int(files),
    }


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["step"], r["shards"]) for r in results}):
        series = sorted((r for r in results if (r["step"], r["shards"]) == key), key=lambda r: r["rows"])
        label = key[0] if key[1] == 1 else f"{key[0]} ({key[1]} shards)"
        a.plot(
            [r["rows"] for r in series],
            [r["rows_in"] / (r.get("work_seconds") or r["seconds"]) for r in series],
            marker="o",
            label=label,
        )
        # the memory the process holds itself (RssAnon) where it was sampled: ru_maxrss also counts the pages
        # of memory-mapped files it touched (train's tokenized Arrow table), which the kernel may drop at any
        # time
        held = [r for r in series if r.get("anon_mb")]
        line = (
            b.plot([r["rows"] for r in held], [r["anon_mb"] for r in held], marker="o", label=label)[0]
            if held
            else None
        )
        b.plot(
            [r["rows"] for r in series],
            [r["rss_mb"] for r in series],
            marker=".",
            linestyle=":",
            alpha=0.5,
            color=line.get_color() if line else None,
        )
    a.set(
        xscale="log",
        yscale="log",
        xlabel="rows (N)",
        ylabel="rows / s, one core (translate, judge: own work)",
        title="Throughput against N",
    )
    b.set(
        xscale="log",
        yscale="log",
        xlabel="rows (N)",
        ylabel="MB: anonymous (solid), peak RSS (dotted)",
        title="Memory against N",
    )
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--shards", type=int, nargs="+", default=[2, 8])
    p.add_argument(
        "--judge-max-rows",
        type=int,
        default=None,
        help="measure judge only up to this N (its pairs are ~2.2 N)",
    )
    p.add_argument(
        "--tokenize-max-rows", type=int, default=100_000, help="measure train's tokenization up to this N"
    )
    p.add_argument("--prepare-only", action="store_true", help="measure prepare alone")
    p.add_argument(
        "--array", action="store_true", help="write the source as one JSON array instead of JSON lines"
    )
    p.add_argument(
        "--alpaca",
        action="store_true",
        help="prepare alone, on rows in Alpaca's format (instruction, input, output)",
    )
    p.add_argument(
        "--no-language-id", action="store_true", help="translate's gate without language identification"
    )
    p.add_argument(
        "--tokens-per-s",
        type=float,
        default=0,
        help="translate's stand-in takes as long as a GPU at this many output tokens/s per shard would "
        "(hala.kit.engine.InstantEngine), overlapped with the stage's work as vLLM's engine is: what the "
        "shard spends beyond that is its own work that generation does not hide",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=2048,
        help="translate's rows per chunk (the stage's default is 256; with a model, chunk k+1 generates "
        "while chunk k is gated and written, so only the first chunk's planning and the last one's "
        "finishing are not hidden)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "scale.json")
    args = p.parse_args()
    global LANGUAGE_ID, CHUNK_ROWS
    LANGUAGE_ID = not args.no_language_id
    CHUNK_ROWS = args.chunk_rows
    env = {
        **os.environ,
        **({"HALA_BENCH_TOKENS_PER_S": str(args.tokens_per_s)} if args.tokens_per_s else {}),
        "HALA_BENCH_ENGINE": "instant",
        "HALA_LOG_FORMAT": "json",
        "OMP_NUM_THREADS": "1",
        "HALA_CACHE": os.environ.get("HALA_CACHE", str(Path.home() / ".cache" / "hala")),
    }
    results: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out.exists() else []
    print(
        "| step | N | shards | rows/s | rows/s of the stage's work | seconds | peak RSS (MB) | of it "
        "anonymous (MB) | files | gather s |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            source = (
                Path(tmp) / f"{'alpaca' if args.alpaca else 'rows'}-{n}.{'json' if args.array else 'jsonl'}"
            )
            (synthesize_alpaca if args.alpaca else synthesize)(n, source)
            for shards in args.shards:
                folder = Path(tmp) / f"n{n}-s{shards}"
                judge = args.judge_max_rows is None or n <= args.judge_max_rows
                tok = n <= args.tokenize_max_rows and shards == args.shards[0]
                for r in measure(
                    n,
                    shards,
                    source,
                    folder,
                    Path(tmp) / "store",
                    env,
                    judge,
                    args.prepare_only or args.alpaca,
                    tok,
                ):
                    if r["step"].startswith("prepare") and shards != args.shards[0]:
                        continue  # the same prepare each time: one row
                    results = [
                        x
                        for x in results
                        if (x["step"], x["rows"], x["shards"]) != (r["step"], r["rows"], r["shards"])
                    ] + [r]
                    work = f"{r['rows_in'] / r['work_seconds']:,.0f}" if r.get("work_seconds") else "-"
                    print(
                        f"| {r['step']} | {n:,} | {r['shards']} | {r['rows_in'] / r['seconds']:,.0f} | "
                        f"{work} | {r['seconds']:.1f} | "
                        f"{r['rss_mb']:.0f} | {r.get('anon_mb', 0):.0f} | {r['files']} | "
                        f"{r.get('gather_seconds', 0):.1f} |",
                        flush=True,
                    )
                    args.out.write_text(json.dumps(results, indent=1))
                subprocess.run(
                    ["rm", "-rf", str(folder), str(Path(tmp) / "store" / folder.name)], check=False
                )
    plot(results, args.out.with_suffix(".png"))
    print(f"results: {args.out}, plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
