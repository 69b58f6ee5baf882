"""`accelerate launch` for multi-GPU steps: the container command stays `python -m stages.train ...`.

Read before anything heavy is imported: the recipe gives `accelerate` and `processes`; when they ask for
more than one process, this process is replaced by `accelerate launch --config_file <ddp|fsdp>.yaml
--num_processes N -m stages.train <same arguments>`, whose ranks then run the step (rank 0 commits).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hala.contract import logs
from hala.contract import recipe as recipe_mod

CONFIGS = Path(__file__).resolve().parent / "accelerate"


def plan(argv: list[str], gpus: int) -> list[str] | None:
    """The `accelerate launch` command for this step, or None to run here as one process."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return None  # already a rank of a launched job
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--recipe")
    parser.add_argument("--step")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--store")
    parser.add_argument("--run")
    args, _ = parser.parse_known_args(argv)
    if not args.recipe or not args.step:
        return None  # the step runner reports the missing argument
    try:
        config = (
            recipe_mod.load(args.recipe, overrides=args.set, store=args.store, run=args.run)
            .step(args.step)
            .config
        )
    except Exception:  # noqa: BLE001 - the step runner reports recipe problems with its exit codes
        return None
    strategy, processes = config.get("accelerate", "none"), int(config.get("processes", 1))
    if strategy == "none" or processes <= 1:
        return None
    if gpus < processes:
        logs.get("stages.train").warning(
            "running as one process",
            asked=f"{strategy} on {processes} GPUs",
            gpus=gpus,
            why="the step's processes need one GPU each; this machine has fewer",
        )
        return None
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{strategy}.yaml"),
        "--num_processes",
        str(processes),
        "-m",
        "stages.train",
        *argv,
    ]


def relaunch(argv: list[str]) -> None:
    import torch

    command = plan(argv, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if command:
        logs.setup()
        logs.get("stages.train").info("relaunching under accelerate", command=" ".join(command))
        os.execv(command[0], command)
