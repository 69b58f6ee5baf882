"""The step command line, built here for every runner: the local runner (`python -m stages.<stage> ...` with
the Python of the stage's environment), compose and Kubernetes (`hala-stage <stage> ...`, the images'
ENTRYPOINT).

    step_flags(recipe, step, shard, store, recipe_arg, force)  # --recipe R --step S --store U --run N ...
    image_args(recipe, step, shard, store, recipe_arg)  # stage + flags: compose services, Kubernetes Jobs
    set_args(recipe)  # the recipe's --set overrides, for every command

A gather, a record or a report without the run's overrides would see another recipe (another fingerprint) than
the steps, so every command of a DAG carries `set_args`.
"""

from __future__ import annotations

from hala.contract.recipe import Recipe, Step


def set_args(recipe: Recipe) -> list[str]:
    """The recipe's --set overrides, as arguments."""
    return [arg for item in recipe.overrides for arg in ("--set", item)]


def step_flags(
    recipe: Recipe,
    step: Step,
    shard: tuple[int, int] | None,
    store: str,
    recipe_arg: str,
    force: bool = False,
) -> list[str]:
    """What follows the stage (or its module) on a step's command line, the same for every runner."""
    flags = [
        "--recipe",
        recipe_arg,
        "--step",
        step.name,
        "--store",
        store,
        "--run",
        recipe.run,
        *set_args(recipe),
    ]
    if shard:
        flags += ["--shard", f"{shard[0]}/{shard[1]}"]
    if force:
        flags.append("--force")
    return flags


def image_args(
    recipe: Recipe, step: Step, shard: tuple[int, int] | None, store: str, recipe_arg: str
) -> list[str]:
    """The step command inside an image, after its ENTRYPOINT `hala-stage`: the stage, then the same flags."""
    return [step.stage, *step_flags(recipe, step, shard, store, recipe_arg)]
