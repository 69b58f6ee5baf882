"""`hala gc RUN [--delete] [--grace SECONDS]`: the files of a run (and of the store's content-addressed
artifacts, `_sources/` and `_cache/`) that no commit references: attempts that lost or failed, shard attempts
no part names, chunk files no marker names, and the work area of a committed step that a crash after its
commit left behind.

Commits never delete what another attempt may reference (hala.contract.store: outputs are immutable, in a
folder per attempt, and the manifest is one conditional write), so what they leave behind is collected here,
the way Delta Lake's VACUUM and Iceberg's orphan-file removal do. Two rules keep a running writer safe: a step
whose lease (or one of its shards') is held is skipped whole, and no file younger than the grace period is
taken (default one hour). The work area of a step that is not committed is its resumable state and is kept,
but for what no marker or part names. `hala status` shows the same figures without taking anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hala.contract import lease, logs
from hala.contract.store import ATTEMPT, MANIFEST, PART, WORK, Store

GRACE_S = 3600.0
BOOKKEEPING = ("_status", "_logs", "_leases", "_report", "_RUN.json")
ARTIFACT_RUNS = ("_sources", "_cache")


class _Quiet:
    """A logger that says nothing: `hala gc --json` prints one JSON document and nothing else on stdout."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        pass


QUIET = _Quiet()


@dataclass
class Garbage:
    """What one collection found: each unreferenced file with its size and why, and the steps it left
    alone."""

    files: list[tuple[str, int, str]] = field(default_factory=list)  # (path, bytes, reason)
    busy: list[str] = field(default_factory=list)  # steps whose lease a writer holds
    young: int = 0  # unreferenced files kept because they are younger than the grace period

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.files)

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, _, reason in self.files))


def _age(info: dict[str, Any], now: float) -> float:
    """Seconds since a listed file was last written (local mtime, S3 LastModified, GCS updated)."""
    stamp = info.get("mtime", info.get("LastModified", info.get("updated")))
    if isinstance(stamp, str):
        stamp = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if isinstance(stamp, dt.datetime):
        stamp = stamp.timestamp()
    return now - float(stamp) if stamp is not None else float("inf")


def _folders(store: Store, run: str) -> list[tuple[str, str]]:
    """(run, step) of every step folder of `run`, and of every artifact of the store."""
    out = []
    for name in (run, *ARTIFACT_RUNS):
        try:
            entries = store.fs.ls(store.path(name), detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            step = entry.rstrip("/").rsplit("/", 1)[-1]
            if step not in BOOKKEEPING and not step.startswith("."):
                out.append((name, step))
    return sorted(set(out))


def _unreferenced(
    store: Store, run: str, step: str, listing: dict[str, dict[str, Any]]
) -> list[tuple[str, str]]:
    """(path, reason) of the files of one step folder that nothing committed or resumable references."""
    root = store.path(run, step)
    manifest = store.read_manifest(run, step)
    keep = {f"{root}/{MANIFEST}"}
    if manifest is not None:
        keep |= {
            f"{root}/{f['path']}"
            for out in manifest.get("outputs", {}).values()
            for f in out.get("files", [])
        }
    work = f"{root}/{WORK}/"
    parts: dict[str, dict[str, Any] | None] = {}  # a shard's folder -> its part (None: not committed yet)
    markers: dict[str, set[str]] = {}  # a chunks folder -> the files its markers name
    found = []
    for path in sorted(listing):
        rel = path[len(root) + 1 :]
        name = rel.rsplit("/", 1)[-1]
        if path in keep or name.startswith("."):
            continue  # committed, or a lock file of a conditional write
        if not path.startswith(work):
            found.append(
                (
                    path,
                    "not in the manifest"
                    if not rel.startswith(ATTEMPT)
                    else "an attempt the manifest does not name",
                )
            )
            continue
        if manifest is not None:
            found.append((path, "work area of a committed step"))
            continue
        # resumable state of a step not committed yet: only what no part or marker names
        segments = rel.split("/")
        if "shards" in segments:
            shard_dir = "/".join([root, *segments[: segments.index("shards") + 2]])
            if shard_dir not in parts:
                parts[shard_dir] = store.read_json(f"{shard_dir}/{PART}")
            inner = path[len(shard_dir) + 1 :]
            part = parts[shard_dir]
            if (
                inner.startswith(ATTEMPT)
                and part is not None
                and not inner.startswith(f"{ATTEMPT}{part.get('attempt')}/")
            ):
                found.append((path, "a shard attempt its part does not name"))
                continue
        if "chunks" in segments and "_done" not in segments and name.startswith("chunk-"):
            chunks_dir = "/".join([root, *segments[: segments.index("chunks") + 1]])
            if chunks_dir not in markers:
                markers[chunks_dir] = _marker_files(store, chunks_dir)
            if path[len(chunks_dir) + 1 :] not in markers[chunks_dir]:
                found.append((path, "a chunk file no marker names"))
    return found


def _marker_files(store: Store, chunks_dir: str) -> set[str]:
    try:
        paths = store.fs.ls(f"{chunks_dir}/_done", detail=False, refresh=True)
    except FileNotFoundError:
        return set()
    names: set[str] = set()
    for p in paths:
        if p.rstrip("/").rsplit("/", 1)[-1][:6].isdigit():
            marker = store.read_json(p) or {}
            names |= {"/".join(str(f).split("/")[-2:]) for f in (marker.get("files") or {}).values()}
    return names  # relative to the chunks folder (older markers held absolute paths: their last two parts)


def collect(
    store: Store,
    run: str,
    grace_s: float = GRACE_S,
    delete: bool = False,
    leases: bool = True,
    log: Any = None,
) -> Garbage:
    """The run's garbage (and the artifacts'), from one listing. With `leases`, each step is looked at under
    its own lease, taken without waiting (a step a writer holds is skipped); `delete` removes what was found.
    Without (`hala status`), it is an estimate that takes nothing."""
    log = log or logs.get("hala.gc")
    result = Garbage()
    now = time.time()
    listing: dict[str, dict[str, Any]] = {}
    for name in (run, *ARTIFACT_RUNS):
        try:
            listing.update(
                {
                    p.rstrip("/"): info
                    for p, info in store.fs.find(store.path(name), detail=True).items()
                    if info.get("type", "file") != "directory"
                }
            )
        except FileNotFoundError:
            continue
    for owner, step in _folders(store, run):
        root = store.path(owner, step)
        files = {p: info for p, info in listing.items() if p.startswith(root + "/")}
        if not files and not (delete and store.is_local):
            continue
        guard = lease.held(store, owner, step, log, wait=False) if leases else contextlib.nullcontext()
        # the folders' times before anything is removed: a removal below a folder makes it look new
        changed = _folder_times(root) if delete and store.is_local else {}
        try:
            with guard:
                if leases and _shards_busy(store, owner, step):
                    raise lease.Busy(step)
                for path, reason in _unreferenced(store, owner, step, files):
                    info = files[path]
                    if _age(info, now) < grace_s:
                        result.young += 1
                        continue
                    result.files.append((path, int(info.get("size") or 0), reason))
                    if delete:
                        store.fs.rm_file(path)
                        _prune(store, path, root)
                if delete and store.is_local:
                    _remove_empty(root, now - grace_s, changed)
        except lease.Busy:
            result.busy.append(f"{owner}/{step}")
    if delete and result.files:
        log.info(
            "removed", run=run, files=len(result.files), bytes=result.bytes, by_reason=result.by_reason()
        )
    return result


def _prune(store: Store, path: str, root: str) -> None:
    """Local stores: the folders a removal left empty, up to the step's (object stores have no empty
    folders)."""
    if not store.is_local:
        return
    import os

    folder = os.path.dirname(path)
    while len(folder) > len(root):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


def _folder_times(root: str) -> dict[str, float]:
    import os

    out = {}
    for folder, _, _ in os.walk(root):
        try:
            out[folder] = os.stat(folder).st_mtime
        except OSError:
            continue
    return out


def _remove_empty(root: str, before: float, changed: dict[str, float]) -> None:
    """Local stores: empty folders under a step's (a killed attempt's, before it wrote its first file, or
    emptied by this collection), when they were last changed before `before` as they were found (`changed`:
    removing a folder's files makes it look new); a fresh one may be a running attempt's that has not
    written yet."""
    import os

    for folder, subdirs, names in os.walk(root, topdown=False):
        if folder == root or names or any(os.path.isdir(os.path.join(folder, d)) for d in subdirs):
            continue
        try:
            if changed.get(folder, os.stat(folder).st_mtime) < before:
                os.rmdir(folder)
        except OSError:
            continue


def _shards_busy(store: Store, run: str, step: str) -> bool:
    """A shard of the step holds its lease (shards run side by side under leases of their own)."""
    folder = store.path(run, lease.LEASES)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(folder, detail=False, refresh=True)]
    except FileNotFoundError:
        return False
    for name in names:
        base = name.rsplit(".", 1)[0]
        if store.is_shard_of(base, step):
            try:
                with lease.held(store, run, base, logs.get("hala.gc"), wait=False):
                    pass
            except lease.Busy:
                return True
    return False
