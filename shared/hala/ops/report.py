"""`hala report RUN`: one self-contained HTML page (and a Markdown twin) about a run, from its manifests
alone.

    hala report tiny --store artifacts            # -> artifacts/tiny/_report/report.html and report.md

What it shows: every step of the run with its state, time, rows, cache hit; quarantine counts by reason;
the FP8 acceptance check; translation scores; the Arabic benchmarks with the paper's published rows beside
ours; plots as embedded PNG (training loss curves, throughput per step, reasons rows were left out).
Nothing is recomputed: a number on the page is a number in a manifest. matplotlib draws the plots (the CLI
set has it); without it the page says so and keeps its tables.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.metadata
import io
import json
from pathlib import Path
from typing import Any

from hala.contract.hashing import sha256_json
from hala.contract.store import Store
from hala.ops import runs

# Published numbers (hala-paper.md, sections 4 and 8): the translator on EN->AR MMLU, and the six OALL v2
# families without ALRAGE (AraLingBench Table 4, whose averages reproduce the report's 41.9/46.9/51.4/69.9).
PAPER_TRANSLATOR = {"base": {"bleu": 16.0, "chrf++": 43.2}, "model": {"bleu": 48.2, "chrf++": 64.2}}
FAMILIES = ["alghafa", "arabic_mmlu", "arabic_exams", "madinah_qa", "aratrust", "arabic_mmlu_ht"]
FAMILY_TITLES = {
    "alghafa": "AlGhafa",
    "arabic_mmlu": "ArabicMMLU",
    "arabic_exams": "EXAMS",
    "madinah_qa": "MadinahQA",
    "aratrust": "AraTrust",
    "arabic_mmlu_ht": "ArbMMLU-HT",
}
PAPER_BENCHMARKS = {
    "350m": ("Hala-350M", [51.4, 41.2, 36.9, 34.5, 52.1, 35.4], 41.9),
    "700m": ("Hala-700M", [55.5, 45.9, 40.6, 34.7, 65.2, 39.4], 46.9),
    "1.2b": ("Hala-1.2B", [59.2, 48.6, 43.4, 41.6, 71.7, 44.2], 51.4),
    "9b": ("Hala-9B", [78.3, 65.6, 53.8, 70.4, 89.6, 61.4], 69.9),
}


def collect(store: Store, run: str) -> dict[str, Any]:
    """Everything the page shows, read from the run's files."""
    info = store.read_json(store.path(run, "_RUN.json")) or {}
    rows = runs.status(store, run)
    manifests = {r["step"]: store.read_manifest(run, r["step"]) for r in rows}
    inputs = {s["step"]: s.get("inputs", {}) for s in info.get("steps", [])}
    return {
        "run": run,
        "store": store.url,
        "recipe": info.get("recipe"),
        "started": info.get("started"),
        "finished": info.get("finished"),
        "steps": rows,
        "manifests": manifests,
        "inputs": inputs,
    }


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def sections(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for every table of the page, shared by the HTML and the Markdown."""
    out = []
    m = data["manifests"]
    names = {r["step"] for r in data["steps"]}

    def source(ref: str) -> str:  # "train-hala-1.2b.model" -> the step; "tiny:lfm2-1.2b" and paths stay whole
        head = ref.rsplit(".", 1)[0]
        return head if head in names else ref

    steps = [
        [
            r["step"],
            r["stage"],
            r["state"],
            "yes" if r["cached"] else "",
            _fmt(r["seconds"]),
            ", ".join(k if v is None else f"{k}={v}" for k, v in (r["rows"] or {}).items()),
            _fmt((r["counts"] or {}).get("rows_quarantined")),
            ", ".join(sorted({source(str(v)) for v in data["inputs"].get(r["step"], {}).values()})),
        ]
        for r in data["steps"]
    ]
    out.append(
        (
            "Steps",
            ["step", "stage", "state", "cached", "seconds", "rows out", "quarantined", "inputs"],
            steps,
            "In dependency order. A cached step was not run again: its committed output had the same "
            "fingerprint.",
        )
    )
    q = []
    for name, man in m.items():
        for reason, n in sorted(((man or {}).get("quarantine") or {}).get("by_reason", {}).items()):
            if n:
                q.append([name, f"quarantine: {reason}", str(n)])
        for reason, n in sorted((((man or {}).get("counts") or {}).get("rows_removed") or {}).items()):
            if n:
                q.append([name, f"removed: {reason}", str(n)])
    out.append(
        (
            "Rows left out",
            ["step", "reason", "rows"],
            q,
            "Quarantined rows keep their reason in the step's quarantine output.",
        )
    )
    fp8 = [
        [
            name,
            _fmt(r["reference"]["chrf++"]),
            _fmt(r["fp8"]["chrf++"]),
            _fmt(r["chrf_drop"], 2),
            _fmt(r["max_quality_drop"], 2),
            _fmt(r["throughput_ratio"], 2),
            "yes" if r["accepted"] else "NO",
            "native" if r["device"].get("fp8_native") else f"emulated ({r['device']['type']})",
        ]
        for name, r in _metrics(m, "fp8_acceptance")
    ]
    out.append(
        (
            "FP8 acceptance",
            [
                "step",
                "source chrF++",
                "FP8 chrF++",
                "drop",
                "allowed",
                "throughput FP8/source",
                "accepted",
                "FP8 compute",
            ],
            fp8,
            "The paper: ~2x throughput with no quality loss (on GPUs with FP8, compute capability >= 8.9). "
            "On a CPU FP8 is emulated, so its throughput ratio says nothing about a GPU.",
        )
    )
    tr = []
    for name, r in _metrics(m, "translation"):
        for side in ("base", "model"):
            if side in r:
                tr.append(
                    [
                        name,
                        side,
                        r[side]["input"]["ref"],
                        _fmt(r[side]["bleu"]),
                        _fmt(r[side]["chrf++"]),
                        _fmt(PAPER_TRANSLATOR[side]["bleu"]),
                        _fmt(PAPER_TRANSLATOR[side]["chrf++"]),
                        str(r["rows"]),
                    ]
                )
    out.append(
        (
            "Translation quality",
            ["step", "side", "model", "BLEU", "chrF++", "paper BLEU", "paper chrF++", "pairs"],
            tr,
            "sacrebleu, corpus level; the paper's figures are LFM2-1.2B -> the Hala translator on EN->AR "
            "MMLU.",
        )
    )
    bench = []
    for name, r in _metrics(m, "benchmarks"):
        note = " (format only)" if r.get("data_origin") == "format_only" else ""
        for side in ("base", "model"):
            if side in r:
                fams = r[side]["families"]
                bench.append(
                    [
                        name,
                        side + note,
                        *[_fmt(100 * fams[f]) if f in fams else "-" for f in FAMILIES],
                        _fmt(100 * r[side]["average"]) if r[side]["average"] is not None else "-",
                        str(len(r[side]["failures"])),
                    ]
                )
        paper = next((v for k, v in PAPER_BENCHMARKS.items() if name.endswith(f"-{k}")), None)
        if paper:
            bench.append([name, f"paper: {paper[0]}", *[_fmt(x) for x in paper[1]], _fmt(paper[2]), ""])
    out.append(
        (
            "Arabic benchmarks (acc_norm x 100)",
            ["step", "side", *[FAMILY_TITLES[f] for f in FAMILIES], "average", "failed tasks"],
            bench,
            "LightEval's OALL v2 tasks without ALRAGE. Rows marked format only were scored on a few items "
            "written "
            "to each task's format (the tiny recipe): they check the pipeline, not the model.",
        )
    )
    return out


def _metrics(manifests: dict[str, Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (n, man["metrics"])
        for n, man in manifests.items()
        if man and (man.get("metrics") or {}).get("kind") == kind
    ]


# --- plots -------------------------------------------------------------------------------------------------


def plots(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each plot; empty without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    m = data["manifests"]
    curves = {
        n: man["metrics"]["loss_curve"]["train"]
        for n, man in m.items()
        if man and "loss_curve" in (man.get("metrics") or {}) and man["metrics"]["loss_curve"]["train"]
    }
    if curves:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for name, pts in curves.items():
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=name, marker=".")
        ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
        ax.legend(fontsize=7)
        out.append(("Training loss curves", _png(fig, plt)))
    generation, training = [], []
    for n, man in m.items():
        mm = (man or {}).get("metrics") or {}
        tps = mm.get("train_tokens_per_second") or mm.get("tokens_per_second")
        if tps:
            training.append((n, float(tps)))
        elif man and man.get("stage") == "translate":
            # engine start-up excluded; shards run side by side, so their rates add up
            per_shard = mm.get("shards") or [mm]
            rates = [
                s["completion_tokens"] / s["generation_seconds"]
                for s in per_shard
                if s.get("completion_tokens") and s.get("generation_seconds")
            ]
            if rates:
                generation.append((n, sum(rates)))
    for title, xlabel, bars in (
        ("Generation throughput per step (engine start-up excluded)", "completion tokens / s", generation),
        ("Training throughput per step", "training tokens / s", training),
    ):
        if bars:
            fig, ax = plt.subplots(figsize=(7, 0.35 * len(bars) + 1.2))
            ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#4a7bb7")
            ax.set(xlabel=xlabel, title=title)
            out.append((title, _png(fig, plt)))
    reasons: dict[str, int] = {}
    for man in m.values():
        for reason, n in (((man or {}).get("quarantine") or {}).get("by_reason") or {}).items():
            reasons[f"quarantine: {reason}"] = reasons.get(f"quarantine: {reason}", 0) + n
        for reason, n in ((((man or {}).get("counts") or {}).get("rows_removed")) or {}).items():
            reasons[f"removed: {reason}"] = reasons.get(f"removed: {reason}", 0) + n
    reasons = {k: v for k, v in reasons.items() if v}
    if reasons:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(reasons) + 1.2))
        items = sorted(reasons.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color="#c4604f")
        ax.set(xlabel="rows", title="Why rows were left out (all steps)")
        out.append(("Rows left out, by reason", _png(fig, plt)))
    return out


def _png(fig: Any, plt: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


# --- rendering ---------------------------------------------------------------------------------------------


def render_markdown(data: dict[str, Any], tables: list[tuple[str, list[str], list[list[str]], str]]) -> str:
    lines = [
        f"# Hala run `{data['run']}`",
        "",
        f"Recipe `{data['recipe']}`, store `{data['store']}`, "
        f"started {data['started']}, finished {data['finished']}.",
        "",
    ]
    for title, header, rows, note in tables:
        lines += [f"## {title}", "", note, ""]
        if not rows:
            lines += ["(none in this run)", ""]
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.append("")
    lines += ["Plots: see report.html.", ""]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:80rem;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem;font-size:0.85rem}
th,td{border:1px solid #ccc;padding:0.25rem 0.5rem;text-align:left}
th{background:#f0f0f0}p.note{color:#555;font-size:0.85rem}
img{max-width:100%;border:1px solid #ddd;margin:0.5rem 0}"""


def render_html(
    data: dict[str, Any],
    tables: list[tuple[str, list[str], list[list[str]], str]],
    images: list[tuple[str, str]],
) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Hala run {e(data['run'])}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>Hala run <code>{e(data['run'])}</code></h1>",
        f"<p>Recipe <code>{e(str(data['recipe']))}</code>, store <code>{e(str(data['store']))}</code>, "
        f"started {e(str(data['started']))}, finished {e(str(data['finished']))}.</p>",
    ]
    for title, header, rows, note in tables:
        slug = title.lower().split(" (")[0].replace(" ", "-")
        parts.append(f"<h2>{e(title)}</h2><p class='note'>{e(note)}</p>")
        if not rows:
            parts.append("<p>(none in this run)</p>")
            continue
        parts.append(
            f"<table id='{slug}'><thead><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in header)
            + "</tr></thead><tbody>"
        )
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>")
    parts.append("<h2>Plots</h2>")
    if not images:
        parts.append("<p>matplotlib is not installed here: no plots.</p>")
    for title, b64 in images:
        parts.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def plot_key(manifests: dict[str, Any]) -> str:
    """What the plots are a function of: the manifests, this module's code and matplotlib's version."""
    try:
        mpl = importlib.metadata.version("matplotlib")
    except importlib.metadata.PackageNotFoundError:
        mpl = None
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return sha256_json({"manifests": manifests, "code": code, "matplotlib": mpl})


def cached_plots(fs: Any, folder: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    """The plots of `data`, drawn again only when the manifests changed: a rerun whose steps were all cached
    reuses them from <folder>/plots.json (drawing them is most of a report's time: matplotlib's import and
    its PNGs)."""
    key = plot_key(data["manifests"])
    path = f"{folder}/plots.json"
    try:
        saved = json.loads(fs.cat_file(path))
        if saved.get("key") == key:
            return [(title, png) for title, png in saved["plots"]]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: draw them
    images = plots(data)
    fs.pipe_file(path, json.dumps({"key": key, "plots": images}).encode())
    return images


def write(store: Store, run: str, out: str | None = None) -> tuple[str, str]:
    """Write report.html and report.md (default: <store>/<run>/_report/); returns their locations."""
    data = collect(store, run)
    tables = sections(data)
    folder = out or store.path(run, "_report")
    fs = store.fs if out is None else __import__("fsspec").core.url_to_fs(out)[0]
    fs.makedirs(folder, exist_ok=True)
    page = render_html(data, tables, cached_plots(fs, folder, data))
    md = render_markdown(data, tables)
    paths = (f"{folder}/report.html", f"{folder}/report.md")
    with fs.open(paths[0], "w", encoding="utf-8") as f:
        f.write(page)
    with fs.open(paths[1], "w", encoding="utf-8") as f:
        f.write(md)
    return paths
