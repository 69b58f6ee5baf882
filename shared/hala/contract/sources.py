"""Resolve a step's inputs: their identity (for the cache key) and where to read them.

The identity of an input (`key`) is what the fingerprint of the consuming step hashes:
- a step output: the aggregate sha256 its manifest records (so byte-identical upstream reruns keep
  downstream steps cached);
- a local file or folder, or a memory:// URL: the sha256 of its content;
- another fsspec URL (s3://, gs://): the filesystem's own identity of the object (ETag, mtime), since
  hashing terabytes on every plan would cost more than it saves;
- a hub repository: its id and commit: the recipe's (`hub:ORG/NAME@REV`), the lock's (`hala pin`), or the one
  its branch names now (hub_revision; exit 2 when nothing pins it and the hub cannot be asked);
- a tiny stand-in model: the hash of its build spec (architecture, sample pairs, builder code).
"""

from __future__ import annotations

import functools
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from hala.contract import tiny_spec
from hala.contract.errors import ConfigError, DataError
from hala.contract.hashing import WORKERS, sha256_json, sha256_tree
from hala.contract.recipe import InputRef, Recipe, Step, cache_config, hub_key, is_commit, lock_path
from hala.contract.store import Store, cache_root


class NotCommitted(ConfigError):
    """An input comes from a step that has no manifest (yet) in this run."""


class Unpinned(ConfigError):
    """A hub input pinned neither by the recipe nor by its lock, while the hub cannot be asked for its
    commit."""


@dataclass
class ResolvedInput:
    ref: InputRef
    key: str
    uri: str
    store: Store | None = None
    run: str | None = None
    manifest: dict[str, Any] | None = None  # the producer's manifest, for step outputs
    # hub: the revision read (a commit sha, or the recipe's tag where the hub is not asked)
    revision: str | None = None

    @property
    def kind(self) -> str:
        return self.ref.kind

    @property
    def output(self) -> dict[str, Any] | None:
        if self.manifest is None:
            return None
        return self.manifest["outputs"][self.ref.output]

    @property
    def folder_name(self) -> str | None:
        """A step output's own folder name, the lineage it carries (`tiny-teacher-FP8-Dynamic`), without the
        attempt folder it lies in; None for other inputs."""
        path = (self.output or {}).get("path")
        return path.rstrip("/").rsplit("/", 1)[-1] if path else None

    def record(self) -> dict[str, Any]:
        """How the consuming step's manifest remembers this input."""
        rec: dict[str, Any] = {"ref": self.ref.raw, "kind": self.kind, "uri": self.uri, "sha256": self.key}
        if self.kind == "step":
            rec.update(step=self.ref.step, output=self.ref.output, rows=(self.output or {}).get("rows"))
        if self.kind == "hub":
            rec.update(
                revision=self.revision, pinned=self.ref.pinned or "resolved", repo_type=self.ref.hub_type
            )
        return rec

    def local_path(self) -> str:
        """A local path to read, after checking every file against its manifest (step outputs)."""
        if self.kind == "path":
            return self.uri
        if self.kind == "step":
            assert self.store is not None and self.run is not None and self.manifest is not None
            return self.store.localize(self.run, self.ref.step or "", self.manifest, self.ref.output or "")
        if self.kind == "url":
            return _download(self.uri, self.key)
        if self.kind in ("tiny", "pypi"):
            raise ConfigError(
                f"input '{self.ref.name}': {self.kind} models are built on first use (hala.contract.tiny, "
                "hala.contract.gguf); use ctx.model_path()"
            )
        raise ConfigError(
            f"input '{self.ref.name}' ({self.ref.raw}) is a hub repository: read it with its hub id, not a "
            "path"
        )

    def row_groups(self) -> Any:
        """The input's parquet files as `tables.RowGroups`, read where they lie (ranged reads on an object
        store).

        A sharded reader uses this instead of local_path(): it reads its own rows' bytes, not the dataset.
        Step outputs are checked against their manifest by size here (every file there, none truncated);
        parquet checks its own footer and pages. Re-hashing every byte is `hala verify`'s job, and
        local_path()'s."""
        from hala.contract import tables

        if self.kind == "step":
            assert self.store is not None and self.run is not None and self.manifest is not None
            fs, step = self.store.fs, self.ref.step or ""
            files = [f for f in (self.output or {}).get("files", []) if f["path"].endswith(".parquet")]
            paths = [self.store.path(self.run, step, f["path"]) for f in files]
            sizes = self.store.file_sizes(paths)
            for f, path in zip(files, paths):
                if sizes.get(path) != f["bytes"]:
                    found = "missing" if path not in sizes else f"{sizes[path]} bytes"
                    raise DataError(
                        f"artifact changed since it was written: {self.store.uri(path)} is {found}, its "
                        "manifest "
                        f"says {f['bytes']} bytes; rerun step '{step}' with --force {step}"
                    )
        elif self.kind in ("path", "url"):
            fs, root = fsspec.core.url_to_fs(self.uri)
            paths = [root] if fs.isfile(root) else sorted(fs.glob(f"{root.rstrip('/')}/**/*.parquet"))
        else:
            raise ConfigError(f"input '{self.ref.name}' ({self.ref.raw}) is not a table of rows")
        if not paths:
            raise DataError(f"input '{self.ref.name}' ({self.uri}) holds no parquet file")
        return tables.RowGroups(fs, paths)


def input_key(store: Store, recipe: Recipe, step: Step, ref: InputRef) -> ResolvedInput:
    if ref.kind == "step":
        manifest = store.read_manifest(recipe.run, ref.step or "")
        if manifest is None:
            raise NotCommitted(
                f"step '{step.name}': input '{ref.name}' comes from step '{ref.step}', which is not "
                "committed in run "
                f"'{recipe.run}' of store {store.url}; run it first (hala run {recipe.path} --only "
                f"{ref.step})"
            )
        try:
            entry = manifest["outputs"][ref.output]
        except KeyError:
            raise ConfigError(
                f"step '{step.name}': input '{ref.name}' wants output '{ref.output}' of step '{ref.step}', "
                "which has "
                f"{', '.join(manifest['outputs'])}"
            ) from None
        uri = store.uri(store.output_path(recipe.run, ref.step or "", manifest, ref.output or ""))
        return ResolvedInput(ref, entry["sha256"], uri, store, recipe.run, manifest)
    if ref.kind == "path":
        path = ref.uri or ""
        if not os.path.exists(path):
            raise ConfigError(f"step '{step.name}': input '{ref.name}' not found: {path}")
        return ResolvedInput(ref, sha256_tree(fsspec.filesystem("file"), path), path)
    if ref.kind == "url":
        fs, path = fsspec.core.url_to_fs(ref.uri or "")
        try:
            if fs.protocol in ("memory",) or "memory" in (
                fs.protocol if isinstance(fs.protocol, tuple) else ()
            ):
                key = sha256_tree(fs, path)
            else:
                key = sha256_json({"url": ref.uri, "ukey": fs.ukey(path)})
        except FileNotFoundError:
            raise ConfigError(f"step '{step.name}': input '{ref.name}' not found: {ref.uri}") from None
        return ResolvedInput(ref, key, ref.uri or "")
    if ref.kind == "hub":
        revision = hub_revision(ref, step.name)
        return ResolvedInput(
            ref, sha256_json({"hub": hub_key(ref), "revision": revision}), ref.uri or "", revision=revision
        )
    if ref.kind == "pypi":
        from hala.contract import gguf

        spec = gguf.spec(ref.raw, ref.name)
        key = sha256_json(spec)
        name = gguf.source_name(spec, key)
        return ResolvedInput(ref, key, store.uri(store.path("_sources", name)), store, recipe.run)
    if ref.kind == "tiny":
        spec = tiny_spec.spec(ref.uri or "", recipe)
        key = sha256_json(spec)
        return ResolvedInput(
            ref, key, store.uri(tiny_spec.source_path(store, ref.uri or "", key)), store, recipe.run
        )
    raise ConfigError(f"step '{step.name}': input '{ref.name}': unknown kind {ref.kind}")


def resolve(store: Store, recipe: Recipe, step: Step) -> dict[str, ResolvedInput]:
    """Every input's identity; folders given as paths are hashed at the same time (a merge's two models)."""
    items = list(step.inputs.items())
    if len(items) < 2:
        return {name: input_key(store, recipe, step, ref) for name, ref in items}
    with ThreadPoolExecutor(min(len(items), WORKERS)) as pool:
        return dict(
            zip(
                (name for name, _ in items),
                pool.map(lambda item: input_key(store, recipe, step, item[1]), items),
            )
        )


def fingerprint(step: Step, resolved: dict[str, ResolvedInput]) -> str:
    """The cache key of a step: stage code, typed config (with defaults, less how it reaches an endpoint) and
    the identity of its inputs."""
    assert step.spec is not None
    key = {
        "stage": step.stage,
        "stage_version": step.spec.version,
        "config": cache_config(step.config),
        "inputs": {name: r.key for name, r in sorted(resolved.items())},
    }
    if bench_engine():
        key[BENCH_ENGINE] = bench_engine()  # a benchmark's stand-in outputs are never a model's cached result
    return sha256_json(key)


BENCH_ENGINE = "HALA_BENCH_ENGINE"


def bench_engine() -> str | None:
    """The benchmarks' engine stand-in (hala.kit.engine.InstantEngine), from the environment alone: no recipe
    or config key can select it, and every step's fingerprint includes it, so its outputs never pass for a
    model's in a cache. Here, not in hala.kit.engine: every stage's version covers the modules it imports, and
    prepare imports no engine."""
    value = os.environ.get(BENCH_ENGINE)
    if value and value != "instant":
        raise ConfigError(
            f"{BENCH_ENGINE}={value!r}: the only benchmark engine is 'instant'; unset it to run a model"
        )
    return value or None


def _download(url: str, key: str) -> str:
    target = cache_root() / "urls" / key
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        fs, path = fsspec.core.url_to_fs(url)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        fs.get(path, str(tmp / name), recursive=fs.isdir(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    (entry,) = list(target.iterdir())
    return str(entry)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_commit(repo_type: str, repo: str, revision: str | None) -> str:
    """The commit sha a revision of a Hub repository (its default branch without one) names now: one API call,
    once per process. huggingface_hub's errors pass through (the caller sorts them)."""
    from huggingface_hub import HfApi

    return HfApi().repo_info(repo, repo_type=repo_type, revision=revision, timeout=20).sha


def hub_revision(ref: InputRef, where: str) -> str:
    """The revision a hub input's cache key and its reader use: the recipe's or the lock's commit as it is;
    otherwise the commit its branch (or tag) names now, asked of the hub. An input pinned by nothing, with no
    hub to ask, is exit 2 with the fix: caching it under its name would let its content change under a cached
    step."""
    if is_commit(ref.revision):
        return ref.revision or ""
    why = "HF_HUB_OFFLINE is set"
    if not hub_offline():
        try:
            return hub_commit(ref.hub_type, ref.uri or "", ref.revision)
        except ImportError:
            why = "huggingface_hub is not installed in this environment"
        # sorted here: missing or refused is the recipe's error, the rest the network's
        except Exception as e:  # noqa: BLE001
            name = type(e).__name__
            if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
                raise ConfigError(
                    f"step '{where}': input '{ref.name}' ({ref.raw}): the hub has no {ref.hub_type} "
                    "repository or "
                    f"revision by that name, or refuses this token ({name}); fix the id, or set HF_TOKEN"
                ) from None
            why = f"the hub did not answer ({name}: {str(e)[:200]})"
    if ref.revision:
        # the recipe's branch or tag, as written: pinned by its author, if not to a commit
        return ref.revision
    raise Unpinned(
        f"step '{where}': input '{ref.name}' ({ref.raw}) is not pinned to a revision, and {why}, so its "
        "current "
        f"commit cannot be read. Pin it: write {ref.raw}@<commit sha> in the recipe, or run `hala pin "
        "<recipe>` where "
        "the hub answers (it writes the commits to the lock beside the recipe, e.g. "
        f"{lock_path(Path('recipe.yaml')).name})"
    )
