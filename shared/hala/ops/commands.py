"""The step command line, built here for every runner: the local runner (`python -m stages.<stage> ...` with
the Python of the stage's environment), compose and Kubernetes (`hala-stage <stage> ...`, the images'
ENTRYPOINT).

    step_flags(recipe, step, shard, store, recipe_arg, force)  # --recipe R --step S --store U --run N ...
    image_args(recipe, step, shard, store, recipe_arg)  # stage + flags: compose services, Kubernetes Jobs
    set_args(recipe)  # the recipe's --set overrides, for every command
    served_args(recipe, name, store, recipe_arg, host)  # a served model's process (hala.ops.served)

A gather, a record, a report or a served model's process without the run's overrides would see another recipe
(another fingerprint, so another model folder) than the steps, so every command of a DAG carries `set_args`.
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


def served_args(
    recipe: Recipe, name: str, store: str, recipe_arg: str, host: str = "127.0.0.1", port: int | None = None
) -> list[str]:
    """The arguments of `python -m hala.ops.served` for served model `name` (the model resolved as its steps
    resolve it, then vLLM's OpenAI server or the recipe's own server command), the same for every runner."""
    args = ["--recipe", recipe_arg, "--served", name, "--store", store, "--run", recipe.run, "--host", host]
    if port is not None:
        args += ["--port", str(port)]
    return [*args, *set_args(recipe)]
