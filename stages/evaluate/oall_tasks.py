"""LightEval's own Open Arabic LLM Leaderboard v2 task definitions (prompts, normalised log-likelihood
accuracy), with their data read from local folders when there are any.

`build(data, wanted)` returns the task configs: `data` is a folder holding `<org>/<name>/` copies of the Hub
repositories (README.md with a `configs:` front matter, and the data files); a task whose repository has a
local copy reads it, keeping only the subsets the copy has; without `data` the Hub ids stay (a real run).
LightEval takes custom tasks as a file it imports by path and caches by module name, so each run writes a
small file of its own (`tasks_file`) that calls `build` with that run's arguments.
"""

from __future__ import annotations

import copy
import os

import yaml
from lighteval.tasks.multilingual.tasks import arabic


def local_subsets(folder: str) -> set[str] | None:
    """The config names a local copy declares in its README front matter, or None without a copy."""
    readme = os.path.join(folder, "README.md")
    if not os.path.isfile(readme):
        return None
    text = open(readme, encoding="utf-8").read()
    if not text.startswith("---"):
        return set()
    front = yaml.safe_load(text.split("---", 2)[1]) or {}
    return {c["config_name"] for c in front.get("configs", [])}


def build(data: str | None, wanted: list[str], problems: dict[str, list[str]] | None = None) -> list:
    """The task configs to run. With `problems`, local rows that the prompt functions cannot read are checked
    first, and a task with any is left out and reported there (file:line: what), the others still run."""
    from stages.evaluate.localdata import check

    table = []
    for cfg in arabic.TASKS_TABLE:
        if wanted and cfg.name not in wanted and cfg.name.split(":")[0] not in wanted:
            continue
        if data:
            folder = os.path.join(data, cfg.hf_repo)
            subsets = local_subsets(folder)
            if subsets is None or cfg.hf_subset not in subsets:
                continue
            if problems is not None:
                found = check(folder, cfg.name.split(":")[0], cfg.hf_subset, list(cfg.evaluation_splits))
                if found:
                    problems[cfg.name] = found
                    continue
            # several task classes have their own __init__: dataclasses.replace would fail
            cfg = copy.copy(cfg)
            cfg.hf_repo = folder  # datasets.load_dataset(path=<folder>, name=<subset>) reads it offline
            cfg.hf_revision = None
        if isinstance(
            cfg.few_shots_split, list
        ):  # arabic.py gives ["dev"]; load_dataset wants one split name
            cfg = copy.copy(cfg)
            cfg.few_shots_split = cfg.few_shots_split[0]
        table.append(cfg)
    return table


def tasks_file(folder: str, data: str | None, wanted: list[str]) -> str:
    """A custom-tasks module for one run, under a name no earlier run used."""
    path = os.path.join(
        folder, f"hala_oall_tasks_{os.getpid()}_{abs(hash((data, tuple(wanted), folder)))}.py"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"from stages.evaluate.oall_tasks import build\nTASKS_TABLE = build({data!r}, {wanted!r})\n")
    return path
