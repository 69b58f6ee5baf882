"""Local copies of benchmark data in the Hub repositories' layout, which the evaluate stage reads offline.

    python -m stages.evaluate.localdata --out /data/oall --exams ../shared/data/ar-exams \\
        --arabicmmlu ../shared/data/ar-arabicmmlu-subset/ArabicMMLUs.csv [--per-subset 40]

LightEval's task definitions name Hub repositories (OALL/Arabic_EXAMS, MBZUAI/ArabicMMLU, ...); a folder
`<out>/<org>/<name>/` with a README.md whose front matter lists `configs:` (one per subset, with its split
files) loads through `datasets.load_dataset(<folder>, <subset>)` exactly as the Hub copy would. This module
writes such folders from the files other sources publish: the EXAMS release (one JSON object per question,
Arabic rows) and an ArabicMMLU CSV. Rows it cannot use are reported with their line and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Any

import yaml

LEVELS = {
    "High": "High School",
    "Univ": "University",
    "Middle": "Middle School",
    "Primary": "Primary School",
    "Prof": "Professional",
}


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _readme(
    folder: str, configs: list[dict[str, Any]], source: str, features: dict[str, str] | None = None
) -> None:
    """The front matter `datasets` reads. With `features`, every config declares its column types: a column
    that is null in one split and text in another (a fifth option) would otherwise fail to load."""
    front: dict[str, Any] = {"configs": configs}
    if features:
        front["dataset_info"] = [
            {
                "config_name": c["config_name"],
                "features": [{"name": k, "dtype": v} for k, v in features.items()],
            }
            for c in configs
        ]
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(
            "---\n" + yaml.safe_dump(front, allow_unicode=True, sort_keys=False) + "---\n\n"
            f"Local copy made by stages.evaluate.localdata from {source}.\n"
        )


def exams(src: str, out: str, validation: int = 25) -> dict[str, int]:
    """EXAMS (Arabic) -> OALL/Arabic_EXAMS: question, A-D, answer, subject; the first rows are the few-shot
    split."""
    path = os.path.join(src, "derived", "test_ar.jsonl") if os.path.isdir(src) else src
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                d = json.loads(line)
                choices = {c["label"]: c["text"] for c in d["question"]["choices"]}
                if set("ABCD") - set(choices) or d["answerKey"] not in "ABCD" or not d["answerKey"]:
                    raise ValueError(
                        f"choices {sorted(choices)} / answer {d.get('answerKey')!r}: need A-D and an answer "
                        "among them"
                    )
                rows.append(
                    {
                        "id": d["id"],
                        "question": d["question"]["stem"],
                        **{k: choices[k] for k in "ABCD"},
                        "answer": d["answerKey"],
                        "subject": d["info"]["subject"],
                    }
                )
            except (ValueError, KeyError, TypeError) as e:
                bad.append(f"{path}:{n}: {e}")
    folder = os.path.join(out, "OALL", "Arabic_EXAMS")
    _write_jsonl(os.path.join(folder, "data", "validation.jsonl"), rows[:validation])
    _write_jsonl(os.path.join(folder, "data", "test.jsonl"), rows[validation:])
    _readme(
        folder,
        [
            {
                "config_name": "default",
                "data_files": [
                    {"split": "test", "path": "data/test.jsonl"},
                    {"split": "validation", "path": "data/validation.jsonl"},
                ],
            }
        ],
        path,
    )
    for b in bad:
        print(f"skipped {b}", file=sys.stderr)
    return {
        "test": len(rows) - min(validation, len(rows)),
        "validation": min(validation, len(rows)),
        "skipped": len(bad),
    }


def _clean(v: str | None) -> str | None:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v)


def arabicmmlu(csv_path: str, out: str, per_subset: int | None = None) -> dict[str, int]:
    """An ArabicMMLU CSV -> MBZUAI/ArabicMMLU: one config per subject (+ level), test and dev (is_few_shot)
    splits."""
    subsets: dict[str, dict[str, list]] = {}
    bad = []
    with open(csv_path, encoding="utf-8", newline="") as f:
        for n, r in enumerate(csv.DictReader(f), 2):
            level = r.get("Level") or ""
            name = r["Subject"] if not level else f"{r['Subject']} ({LEVELS.get(level, level)})"
            options = [_clean(r.get(f"Option {i}")) for i in range(1, 6)]
            key = (r.get("Answer Key") or "").strip()
            if key not in "ABCDE" or not key or options["ABCDE".index(key)] is None:
                bad.append(f"{csv_path}:{n}: answer key {key!r} does not name one of the options")
                continue
            row = {
                "ID": int(r["ID"]),
                "Question": r["Question"],
                "Context": _clean(r.get("Context")),
                **{f"Option {i + 1}": o for i, o in enumerate(options)},
                "Answer Key": key,
            }
            split = "dev" if r.get("is_few_shot") == "1" else "test"
            subsets.setdefault(name, {"test": [], "dev": []})[split].append(row)
    folder = os.path.join(out, "MBZUAI", "ArabicMMLU")
    configs, total = [], 0
    for name, splits in sorted(subsets.items()):
        slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
        files = []
        for split, rows in splits.items():
            rows = rows[:per_subset] if per_subset and split == "test" else rows
            if rows:
                _write_jsonl(os.path.join(folder, "data", slug, f"{split}.jsonl"), rows)
                files.append({"split": split, "path": f"data/{slug}/{split}.jsonl"})
                total += len(rows) if split == "test" else 0
        if any(f["split"] == "test" for f in files):
            configs.append({"config_name": name, "data_files": files})
    _readme(
        folder,
        configs,
        csv_path,
        {
            "ID": "int64",
            "Question": "string",
            "Context": "string",
            **{f"Option {i}": "string" for i in range(1, 6)},
            "Answer Key": "string",
        },
    )
    for b in bad:
        print(f"skipped {b}", file=sys.stderr)
    return {"subsets": len(configs), "test": total, "skipped": len(bad)}


# What each OALL v2 family's prompt function reads from a row (lighteval.tasks.multilingual.tasks.arabic).
AR_LETTERS = ["أ", "ب", "ج", "د", "هـ"]


def _row_problem(family: str, r: dict[str, Any]) -> str | None:
    def text(key: str) -> bool:
        return isinstance(r.get(key), str) and bool(r[key].strip())

    if family == "arabic_exams":
        missing = [k for k in ("question", "A", "B", "C", "D") if not text(k)]
        if missing:
            return f"empty or missing {', '.join(missing)}"
        return None if r.get("answer") in list("ABCD") else f"answer {r.get('answer')!r} is not one of A-D"
    if family in ("arabic_mmlu", "madinah_qa"):
        options = [r.get(f"Option {i}") for i in range(1, 6)]
        if not text("Question") or sum(isinstance(o, str) and bool(o.strip()) for o in options) < 2:
            return "a question and at least two options (Option 1..5) are needed"
        key = r.get("Answer Key")
        if key not in list("ABCDE") or not options["ABCDE".index(key)]:
            return f"Answer Key {key!r} does not name one of the options"
        return None
    if family == "alghafa":
        sols = [r.get(f"sol{i}") for i in range(1, 6) if f"sol{i}" in r]
        try:
            label = int(r.get("label"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return f"label {r.get('label')!r} is not an integer"
        if not text("query") or len(sols) < 2 or not 0 <= label < len(sols):
            return (
                f"needs query, at least two of sol1..sol5 and a label among them (label {label}, "
                f"{len(sols)} solutions)"
            )
        return None
    if family == "aratrust":
        if not all(text(k) for k in ("Question", "A", "B", "C")):
            return "needs Question, A, B and C"
        return (
            None
            if r.get("Answer") in AR_LETTERS[:3]
            else f"Answer {r.get('Answer')!r} is not one of {', '.join(AR_LETTERS[:3])}"
        )
    if family == "arabic_mmlu_ht":
        choices = r.get("choices")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            return (
                "choices must be a list of at least two texts, got "
                f"{json.dumps(choices, ensure_ascii=False)[:80]}"
            )
        answer = r.get("answer")
        return (
            None
            if isinstance(answer, int) and 0 <= answer < len(choices)
            else f"answer {answer!r} is not an index into choices"
        )
    return None


def check(folder: str, family: str, subset: str, splits: list[str]) -> list[str]:
    """Problems of a local copy's rows for one task, as 'file:line: what' (empty when every row can be
    scored)."""
    readme = os.path.join(folder, "README.md")
    front = yaml.safe_load(open(readme, encoding="utf-8").read().split("---", 2)[1]) or {}
    config = next((c for c in front.get("configs", []) if c["config_name"] == subset), None)
    if config is None:
        return [f"{readme}: no config named {subset!r}"]
    problems = []
    files = config.get("data_files", [])
    for split in splits:
        paths = [f["path"] for f in files if f.get("split") == split]
        if not paths:
            problems.append(f"{readme}: config {subset!r} has no {split!r} split")
        for rel in paths:
            path = os.path.join(folder, rel)
            if not path.endswith(".jsonl"):
                continue  # parquet/csv copies are checked by the harness itself
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        problems.append(f"{path}:{n}: not JSON ({e})")
                        continue
                    why = _row_problem(family, row)
                    if why:
                        problems.append(f"{path}:{n}: {why}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--exams", help="the EXAMS folder (derived/test_ar.jsonl) or the JSONL file")
    parser.add_argument(
        "--arabicmmlu",
        help="an ArabicMMLU CSV (columns ID, Subject, Level, Question, Option 1-5, Answer Key, is_few_shot)",
    )
    parser.add_argument(
        "--per-subset",
        type=int,
        default=None,
        help="keep the first N test questions of each ArabicMMLU subset",
    )
    args = parser.parse_args(argv)
    if args.exams:
        print(json.dumps({"exams": exams(args.exams, args.out)}))
    if args.arabicmmlu:
        print(json.dumps({"arabicmmlu": arabicmmlu(args.arabicmmlu, args.out, args.per_subset)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
