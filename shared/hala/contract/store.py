"""The artifact store: `<store>/<run>/<step>/` on any fsspec filesystem.

Layout of one step:

    <step>/_MANIFEST.json             the commit: written last, by one conditional write (hala.contract.cas);
                                      only a step with a manifest exists for readers
    <step>/attempt-<id>/<output>/...  one attempt's outputs, immutable and never moved; the manifest names the
                                      attempt it commits, every other attempt's files are garbage (`hala gc`)
    <step>/_work/<fingerprint>/       work in progress: chunks, checkpoints, shard parts; resumed by a rerun
                                      with the same fingerprint, discarded by one with another, removed at
                                      commit

Every path in a manifest, a part or a chunk marker is relative to the folder that holds it, so a store read
from another mount point (a host folder against `/store` in a container, a moved folder, a copied bucket) is
the same store. A reader trusts only a manifest, and checks the sha256 of every file it reads against it: a
tampered file is a DataError (exit 3) that names the file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from hala.contract import cas
from hala.contract.errors import (
    EXIT_CONFIG,
    EXIT_TEMPORARY,
    ConfigError,
    DataError,
    TemporaryError,
    exit_code_for,
)
from hala.contract.hashing import sha256_file, sha256_files, sha256_listing

MANIFEST = "_MANIFEST.json"
PART = "_PART.json"
WORK = "_work"
ATTEMPT = "attempt-"  # <step>/attempt-<id>/: one attempt's outputs
SCHEMA = "hala.manifest/1"
COUNT_KEYS = ("rows_in", "rows_out", "rows_quarantined", "rows_removed")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


FETCH_WORKERS = 8  # files downloaded at once from a remote store (each over its own connection)


def cache_root() -> Path:
    """This machine's content-addressed cache (HALA_CACHE, default ~/.cache/hala): downloads, localized
    outputs, tiny stand-in builds. Entries are named by what they hold, so every store and process can share
    them."""
    return Path(os.environ.get("HALA_CACHE", Path.home() / ".cache" / "hala"))


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def new_attempt() -> str:
    """A name no other attempt has: when it started (sortable, readable in a listing) and 32 random bits."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def safe_relpath(path: Any, where: str) -> str:
    """A path read from a manifest, a part or a marker, checked before anything is read or written with it:
    relative, forward slashes, no `..`, no empty or hidden-control parts. A DataError (exit 3) naming the file
    otherwise: a manifest that points outside its folder is damaged or forged, and no cache or store path may
    be built from it."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise DataError(
            f"{where}: path {path!r} is not a relative path; the file is damaged (rerun the step that wrote "
            "it)"
        )
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise DataError(
            f"{where}: path {path!r} leaves its folder or has empty parts; the file is damaged "
            "(rerun the step that wrote it)"
        )
    return path


def check_sha256(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise DataError(
            f"{where}: sha256 {value!r} is not 64 hex digits; the file is damaged (rerun the step that "
            "wrote it)"
        )
    return value


def prefixed(outputs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Output entries described relative to an attempt's folder, made relative to the step: `prefix/` before
    each path (the aggregate sha256 is of paths relative to the output itself, so it does not change)."""
    out = {}
    for name, entry in outputs.items():
        out[name] = {
            **entry,
            "path": f"{prefix}/{entry['path']}",
            "files": [{**f, "path": f"{prefix}/{f['path']}"} for f in entry.get("files", [])],
        }
    return out


def manifest_files(manifest: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Every file a manifest (or a part) lists, each path and sha256 checked (safe_relpath, check_sha256)."""
    files = []
    for name, entry in (manifest.get("outputs") or {}).items():
        safe_relpath(entry.get("path"), f"{where}: output {name!r}")
        for f in entry.get("files", []):
            safe_relpath(f.get("path"), f"{where}: output {name!r}")
            check_sha256(f.get("sha256"), f"{where}: {f.get('path')}")
            files.append(f)
    return files


def storage_options(url: str) -> dict[str, Any]:
    """How the store's client retries and waits, set on purpose rather than left to defaults. fsspec's own
    configuration (FSSPEC_CONFIG_DIR, FSSPEC_<PROTOCOL>_<KEY>) wins over these; credentials come from the
    client's standard places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / profiles / instance roles;
    GOOGLE_APPLICATION_CREDENTIALS)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    opts: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        # botocore's standard retry mode: exponential backoff with jitter on throttling (SlowDown), 5xx and
        # dropped connections, 5 attempts in all; a connection gets 10 s, a response 60 s (a part of a
        # multipart upload is 50 MB). s3fs adds its own 5 tries of a call on top (S3FileSystem.retries).
        opts["config_kwargs"] = {
            "retries": {"mode": "standard", "total_max_attempts": 5},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # MinIO, Ceph, R2, a test server: botocore reads these too, older releases did not
            opts["endpoint_url"] = endpoint
    elif protocol in ("gs", "gcs"):
        opts["requests_timeout"] = 60  # gcsfs retries 5xx and dropped connections itself (6 tries, backoff)
    return {**opts, **(fsspec.config.conf.get(protocol) or {})}


class Store:
    def __init__(self, url: str):
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options(url))
        except (ImportError, ValueError) as e:
            raise ConfigError(
                f"store {url!r}: {e} (install the fsspec package for that protocol, e.g. s3fs or gcsfs)"
            ) from e
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # planning only (hala.ops.schedule.probe): manifests read once, file sizes from one listing of the run
        self.memo: dict[str, Any] | None = None
        self.sizes: dict[str, Any] | None = None

    def check(self) -> None:
        """The store answers and can be used: its bucket exists and the credentials are accepted (exit 2 with
        the fix, naming the URL), or it does not answer within the client's retries (exit 75). One request."""
        if self.is_local or "memory" in self.fs.protocol:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            if hasattr(self.fs, "call_s3"):
                self.fs.call_s3("head_bucket", Bucket=bucket)
            else:
                self.fs.info(bucket)
        except FileNotFoundError:
            raise ConfigError(
                f"store {self.url}: bucket {bucket!r} does not exist (or is not visible to these "
                "credentials); "
                "create it, or fix the store URL (--store, the recipe's store:)"
            ) from None
        except Exception as e:  # noqa: BLE001 - classified below: refused, temporary or a bug
            code = exit_code_for(e)
            if (
                code == EXIT_CONFIG
            ):  # S3's AccessDenied (PermissionError), GCS's 403 (gcsfs: OSError "Forbidden")
                raise ConfigError(
                    f"store {self.url}: the credentials were refused ({str(e).splitlines()[0]}); set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile) for s3://, "
                    "GOOGLE_APPLICATION_CREDENTIALS for gs://, for an identity that may read and write the "
                    "bucket"
                ) from None
            if code == EXIT_TEMPORARY:
                raise TemporaryError(
                    f"store {self.url} did not answer after the client's retries: {type(e).__name__}: {e}"
                ) from e
            raise

    # --- paths ------------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def step_path(self, run: str, step: str) -> str:
        return self.path(run, step)

    def work_path(self, run: str, step: str, fingerprint: str) -> str:
        return self.path(run, step, WORK, fingerprint)

    # --- shards: every name and folder of one shard of a step is spelled here -------------------------

    def shards_path(self, run: str, step: str, fingerprint: str) -> str:
        """The folder of a sharded step's shard work (each shard's part, chunks and attempts), under its work
        area."""
        return f"{self.work_path(run, step, fingerprint)}/shards"

    def shard_path(self, run: str, step: str, fingerprint: str, index: int, count: int) -> str:
        """One shard's folder: `<shards_path>/00002-of-00008`."""
        return f"{self.shards_path(run, step, fingerprint)}/{index:05d}-of-{count:05d}"

    @staticmethod
    def shard_name(step: str, index: int, count: int) -> str:
        """One shard of a step as a name (its lease, its status, its log): `<step>.shard-00002-of-00008`."""
        return f"{step}.shard-{index:05d}-of-{count:05d}"

    @staticmethod
    def is_shard_of(name: str, step: str) -> bool:
        """Whether `name` (a lease, a status, a log) is one of `shard_name`'s for `step`."""
        return name.startswith(f"{step}.shard-")

    # --- json -------------------------------------------------------------------------------------

    def read_json(self, path: str) -> dict[str, Any] | None:
        if not self.is_local:
            # s3fs and gcsfs answer "not found" from a listing they cached earlier in this process (a runner
            # that looked at a shard's folder before the shard committed its part): a commit must be read from
            # the store
            self.fs.invalidate_cache(path)
        try:
            return json.loads(self.fs.cat_file(path))  # one GET on an object store (open() adds a HEAD)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise DataError(f"{self.uri(path)}: not valid JSON ({e}); delete it and rerun the step") from e

    def write_json(self, path: str, obj: Any) -> None:
        """Whole-file write that readers never see half-done: rename of a synced file on local disks (created
        with the process's umask, so a group can share the store), one PUT on object stores. For run
        bookkeeping (status, _RUN.json); commits go through `publish`, which is conditional."""
        data = (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()
        if self.is_local:
            tmp = cas._local_whole_file(path, data)
            os.replace(tmp, path)
            cas._fsync_dir(os.path.dirname(path))
        else:
            self.fs.pipe(path, data)

    # --- manifests --------------------------------------------------------------------------------

    def read_manifest(self, run: str, step: str) -> dict[str, Any] | None:
        path = self.path(run, step, MANIFEST)
        if self.memo is not None:
            if path not in self.memo:
                self.memo[path] = self.read_json(path)
            manifest = self.memo[path]
        else:
            manifest = self.read_json(path)
        return self._checked(manifest, path, step)

    def _checked(self, manifest: dict[str, Any] | None, path: str, step: str) -> dict[str, Any] | None:
        if manifest is not None and manifest.get("schema") != SCHEMA:
            raise DataError(
                f"{self.uri(path)}: manifest schema {manifest.get('schema')!r}, "
                f"this hala reads {SCHEMA!r}; rerun the step with --force {step}"
            )
        return manifest

    def manifest_state(self, run: str, step: str) -> tuple[str | None, dict[str, Any] | None]:
        """(version, manifest) of the step's manifest in one read, never from the planning memo: what a writer
        looks at before it computes, and the version its commit expects to replace (None: there was none)."""
        path = self.path(run, step, MANIFEST)
        version, data = self.read_versioned(path)
        return version, self._checked(data, path, step)

    def read_versioned(self, path: str) -> tuple[str | None, dict[str, Any] | None]:
        """(version, JSON object) of a manifest or a part, in one request (hala.contract.cas.read)."""
        version, data = cas.read(self.fs, path)
        if data is None:
            return None, None
        try:
            return version, json.loads(data)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.uri(path)}: not valid JSON ({e}); delete it and rerun the step") from e

    def publish(self, path: str, obj: dict[str, Any], expect: str | None) -> dict[str, Any] | None:
        """The commit: `obj` written at `path` (a manifest, a part) by one conditional write, if what is there
        is still what the writer saw (`expect`: its version, or None for nothing). None when this writer won;
        else what won (a reader sees one or the other, never a mix), or {} when the object was removed
        meanwhile."""
        data = (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()
        try:
            cas.write(self.fs, path, data, expect)
            return None
        except cas.Conflict:
            if cas.owned(self.fs, path, data) is not None:
                return None  # our own write: its answer was lost and the client's retry met it
            return self.read_versioned(path)[1] or {}

    def committed(self, run: str, step: str, fingerprint: str | None) -> dict[str, Any] | None:
        """The one cache predicate: the step's manifest when it is committed under this fingerprint with every
        output file present at its recorded size, else None. A step, a shard's planning, gather, the runner's
        plan, a tiny stand-in and train's tokenized cache all ask this, and nothing else."""
        manifest = self.read_manifest(run, step)
        if manifest is None or fingerprint is None or manifest.get("fingerprint") != fingerprint:
            return None
        return manifest if self.outputs_present(run, step, manifest) else None

    def localize(self, run: str, step: str, manifest: dict[str, Any], output: str) -> str:
        """A local path holding one committed output, every file checked against the manifest: on a local
        store the output itself (re-hashed), on an object store a copy in this machine's content-addressed
        cache (cache_root()/outputs/<sha256>/<output folder name>), fetched once per machine, several files at
        a time, each hashed as it lands, into a folder of its own that is renamed in place whole (a reader
        never meets a copy another process is still writing)."""
        where = f"{self.uri(self.path(run, step, MANIFEST))}"
        entry = manifest["outputs"][output]
        files = manifest_files({"outputs": {output: entry}}, where)
        if self.is_local:
            self.verify_output(run, step, manifest, output)
            return self.path(run, step, entry["path"])
        root = entry["path"].rstrip("/")
        name = root.rsplit("/", 1)[-1]
        target = cache_root() / "outputs" / check_sha256(entry["sha256"], where)
        if (target / ".complete").exists():
            return str(target / name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:16]}-", dir=target.parent))
        local = fsspec.filesystem("file")

        def fetch(f: dict[str, Any]) -> None:
            rel = (
                f["path"][len(root) + 1 :]
                if f["path"].startswith(root + "/")
                else f["path"].rsplit("/", 1)[-1]
            )
            dst = tmp / name / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(self.path(run, step, f["path"]), str(dst))
            digest, size = sha256_file(local, str(dst))
            if digest != f["sha256"] or size != f["bytes"]:
                raise DataError(
                    f"artifact changed since it was written: {self.uri(self.path(run, step, f['path']))} "
                    f"(sha256 {digest[:12]}…, manifest says {f['sha256'][:12]}…); rerun step '{step}' with "
                    f"--force {step}"
                )

        try:
            # largest first, so that the last to finish is small; one at a time this was the slowest way to
            # read an output (bench/store_throughput.py)
            ordered = sorted(files, key=lambda f: -f["bytes"])
            with ThreadPoolExecutor(max(1, min(FETCH_WORKERS, len(ordered)))) as pool:
                for _ in pool.map(fetch, ordered):
                    pass
            (tmp / name).mkdir(parents=True, exist_ok=True)
            (tmp / ".complete").touch()
            try:
                os.rename(tmp, target)
            except OSError:  # another process put the same content there first: read theirs
                if not (target / ".complete").exists():
                    shutil.rmtree(target, ignore_errors=True)  # a half copy of an older hala: replaced
                    os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target / name)

    def output_path(self, run: str, step: str, manifest: dict[str, Any], output: str) -> str:
        try:
            entry = manifest["outputs"][output]
        except KeyError:
            raise ConfigError(
                f"step '{step}' of run '{run}' has no output '{output}'; it has: "
                f"{', '.join(manifest.get('outputs', {}))}"
            ) from None
        return self.path(run, step, entry["path"])

    def file_sizes(self, paths: list[str]) -> dict[str, Any]:
        """Path -> size of those of `paths` that exist: one listing per folder (on S3 a LIST answers for up to
        1,000 files, where a size is one HEAD each), never a cached one; while planning, the run's one
        listing."""
        if self.sizes is not None:
            return self.sizes
        sizes: dict[str, Any] = {}
        for folder in sorted({p.rsplit("/", 1)[0] for p in paths}):
            try:
                for info in self.fs.ls(folder, detail=True, refresh=True):
                    sizes[self.fs._strip_protocol(info["name"]).rstrip("/")] = info.get("size")
            except (FileNotFoundError, NotADirectoryError):
                continue
        return sizes

    def outputs_present(self, run: str, step: str, manifest: dict[str, Any]) -> bool:
        """Cheap check for a cache hit: every listed file exists with its recorded size."""
        files = [
            (self.path(run, step, f["path"]), f["bytes"])
            for entry in manifest.get("outputs", {}).values()
            for f in entry.get("files", [])
        ]
        sizes = self.file_sizes([path for path, _ in files])
        return all(sizes.get(path) == size for path, size in files)

    def list_run(self, run: str) -> dict[str, Any]:
        """Path -> size of every file of a run: one recursive listing (S3: a LIST per 1,000 objects)."""
        try:
            found = self.fs.find(self.path(run), detail=True)
        except FileNotFoundError:
            return {}
        return {name.rstrip("/"): info.get("size") for name, info in found.items()}

    def verify_output(self, run: str, step: str, manifest: dict[str, Any], output: str) -> None:
        """Re-hash every file of one output; DataError (exit 3) naming the first file that differs."""
        files = manifest_files(
            {"outputs": {output: manifest["outputs"][output]}}, self.uri(self.path(run, step, MANIFEST))
        )
        paths = [self.path(run, step, f["path"]) for f in files]
        for path in paths:
            if not self.fs.exists(path):
                raise DataError(
                    f"artifact missing: {self.uri(path)} is listed in the manifest of step '{step}' but "
                    "does not exist; "
                    f"rerun it with --force {step}"
                )
        for f, path, (digest, size) in zip(files, paths, sha256_files(self.fs, paths)):
            if digest != f["sha256"] or size != f["bytes"]:
                raise DataError(
                    f"artifact changed since it was written: {self.uri(path)} (sha256 {digest[:12]}…, "
                    f"manifest says {f['sha256'][:12]}…); rerun step '{step}' with --force {step}"
                )

    def verify_step(self, run: str, step: str) -> dict[str, Any]:
        manifest = self.read_manifest(run, step)
        if manifest is None:
            raise DataError(f"step '{step}' of run '{run}' is not committed (no {MANIFEST})")
        for output in manifest.get("outputs", {}):
            self.verify_output(run, step, manifest, output)
        return manifest

    # --- writing ----------------------------------------------------------------------------------

    def describe(
        self, base: str, rel_dir: str, local: bool, known: dict[str, tuple[str, int, int]] | None = None
    ) -> list[dict[str, Any]]:
        """Files under base/rel_dir (on this machine when `local`, else in the store) with sha256 and size."""
        return describe(
            fsspec.filesystem("file") if local else self.fs, base, rel_dir, known if local else None
        )

    def upload(self, base: str, rels: list[str], dest: str) -> None:
        """Files `base/<rel>` of this machine to `dest/<rel>` in the store, several at a time. Named one by
        one: a folder put into a folder that exists lands inside it (fsspec's rule), which once committed an
        earlier attempt's bytes under a new attempt's hashes."""
        if not rels:
            return
        self.fs.put([os.path.join(base, r) for r in rels], [f"{dest}/{r}" for r in rels])

    def materialize(self, pairs: list[tuple[str, str]]) -> None:
        """(source, destination) store paths: each destination a new name for the source's bytes, the source
        left as it is: a hard link on a local store (no bytes copied; a copy where links are refused), a
        server-side copy on an object store (CopyObject, GCS rewrite: no byte passes through this process)."""
        if self.is_local:
            for src, dst in pairs:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    os.link(src, dst)
                except FileExistsError:
                    os.unlink(dst)  # a retried gather's own earlier link (the names are this attempt's)
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            return
        with ThreadPoolExecutor(max(1, min(FETCH_WORKERS, len(pairs)))) as pool:
            for _ in pool.map(lambda p: self.fs.copy(p[0], p[1]), pairs):
                pass

    def sync(self, folder: str, rels: list[str]) -> None:
        """Local stores: every file `folder/<rel>` and its folders on disk before the manifest that names
        them."""
        if not self.is_local:
            return
        folders = {folder}
        for rel in rels:
            path = os.path.join(folder, rel)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = os.path.dirname(path)
            while len(parent) > len(folder):
                folders.add(parent)
                parent = os.path.dirname(parent)
        for f in sorted(folders, key=len, reverse=True):
            cas._fsync_dir(f)
        cas._fsync_dir(os.path.dirname(folder))

    def remove(self, path: str) -> None:
        """Remove a folder or file of this writer's own (a lost or failed attempt); what cannot be removed now
        is left to `hala gc`, never an error."""
        try:
            if self.is_local:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.exists(path):
                    os.unlink(path)
            elif self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception:  # noqa: BLE001 - garbage for gc; the result does not depend on it
            pass

    def clean_work(self, run: str, step: str, keep: str | None = None) -> None:
        """Drop work areas; `keep` one fingerprint (the current one, when resuming). Best effort: called after
        a commit, where a failure must not turn a committed step into a failed one (what stays is garbage for
        gc)."""
        work = self.path(run, step, WORK)
        try:
            if not self.fs.exists(work):
                return
            for entry in (
                self.fs.ls(work, detail=False, refresh=True)
                if not self.is_local
                else [os.path.join(work, e) for e in os.listdir(work)]
            ):
                if keep is None or entry.rstrip("/").rsplit("/", 1)[-1] != keep:
                    self.fs.rm(entry, recursive=True)
            # on an object store a prefix ends with its last object: nothing is left to remove
            left = self.fs.ls(work, detail=False, refresh=True) if not self.is_local else os.listdir(work)
            if not left:
                self.fs.rm(work, recursive=True)
        except FileNotFoundError:
            return
        except Exception as e:  # noqa: BLE001 - see the docstring
            if keep is not None:
                raise  # before the work: a store that cannot remove stale work cannot take the step's either
            from hala.contract.logs import get

            get("hala.store").warning(
                "work area not removed; `hala gc` will", path=self.uri(work), error=f"{type(e).__name__}: {e}"
            )

    # --- run bookkeeping --------------------------------------------------------------------------

    def write_status(self, run: str, step: str, shard: str | None = None, **fields: Any) -> None:
        """The step's status file (`shard`: "i/n", a shard's own)."""
        if shard:
            index, count = (int(x) for x in shard.split("/"))
            name = self.shard_name(step, index, count)
        else:
            name = step
        self.write_json(
            self.path(run, "_status", f"{name}.json"), {"step": step, "shard": shard, "at": now(), **fields}
        )

    def read_statuses(self, run: str) -> dict[str, dict[str, Any]]:
        folder = self.path(run, "_status")
        out: dict[str, dict[str, Any]] = {}
        if not self.fs.exists(folder):
            return out
        for path in sorted(self.fs.ls(folder, detail=False, refresh=True)):
            if not path.endswith(".json") or path.rsplit("/", 1)[-1].startswith("."):
                continue  # a write's hidden temporary file
            data = self.read_json(path)
            if data:
                key = path.rsplit("/", 1)[-1][: -len(".json")]
                out[key] = data
        return out


def describe(
    fs: Any, base: str, rel_dir: str, known: dict[str, tuple[str, int, int]] | None = None
) -> list[dict[str, Any]]:
    """Files under base/rel_dir with sha256 and size; paths relative to base. `known`: local files already
    hashed by their writer (abs path -> sha256, size, mtime_ns), taken only if size and mtime still match."""
    root = f"{base.rstrip('/')}/{rel_dir}"
    if not fs.exists(root):
        return []
    paths = [root] if fs.isfile(root) else sorted(fs.find(root))
    found: dict[str, tuple[str, int]] = {}
    for p in paths if known else []:
        entry, st = known.get(os.path.abspath(p)), os.stat(p)
        if entry is not None and (entry[1], entry[2]) == (st.st_size, st.st_mtime_ns):
            found[p] = (entry[0], entry[1])
    rest = [p for p in paths if p not in found]
    found.update(zip(rest, sha256_files(fs, rest)))
    return [
        {"path": p[len(base.rstrip("/")) + 1 :], "sha256": found[p][0], "bytes": found[p][1]} for p in paths
    ]


def describe_local(base: str, rel_dir: str) -> list[dict[str, Any]]:
    return describe(fsspec.filesystem("file"), base, rel_dir)


def output_entry(
    files: list[dict[str, Any]], rel_dir: str, kind: str, rows: int | None, **extra: Any
) -> dict[str, Any]:
    prefix = rel_dir.rstrip("/") + "/"
    return {
        "path": rel_dir,
        "kind": kind,
        "rows": rows,
        "bytes": sum(f["bytes"] for f in files),
        "sha256": sha256_listing(
            (f["path"][len(prefix) :] if f["path"].startswith(prefix) else f["path"], f["sha256"])
            for f in files
        ),
        "files": files,
        **extra,
    }


@dataclass(frozen=True)
class Identity:
    """What made an artifact, as its manifest records it: a recipe step (`of_step`), or an artifact no recipe
    names (a tiny stand-in, a tokenized cache) described by its builder."""

    name: str
    stage: str
    stage_version: str | None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None

    @classmethod
    def of_step(cls, step: Any) -> Identity:
        return cls(step.name, step.stage, step.spec.version, step.config, step.config_hash())


def new_manifest(
    *,
    run: str,
    step: Any,
    fingerprint: str,
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    counts: dict[str, Any] | None,
    quarantine: dict[str, Any],
    metrics: dict[str, Any],
    timings: dict[str, Any],
    shards: dict[str, Any] | None,
    attempt: str | None = None,
    lease: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one place a manifest is put together (schema hala.manifest/1; docs/ARCHITECTURE.md lists the
    fields). `step`: a recipe Step or an Identity; `attempt`: the attempt whose folder holds the outputs;
    `lease`: the token of the lease its writer held when it committed (hala.contract.lease.Lease.token)."""
    who = step if isinstance(step, Identity) else Identity.of_step(step)
    return {
        "schema": SCHEMA,
        "run": run,
        "step": who.name,
        "stage": who.stage,
        "stage_version": who.stage_version,
        "code_version": code_version(),
        "image": os.environ.get("HALA_IMAGE"),
        "fingerprint": fingerprint,
        "config": who.config,
        "config_hash": who.config_hash,
        "inputs": inputs,
        "outputs": outputs,
        "counts": counts,
        "quarantine": quarantine,
        "metrics": metrics,
        "timings": timings,
        "shards": shards,
        "attempt": attempt,
        "lease": lease,
        "host": host_info(),
    }


def check_counts(counts: dict[str, Any], where: str) -> None:
    """rows_in = rows_out + rows_quarantined + sum(rows_removed): refuse to commit otherwise."""
    unknown = set(counts) - set(COUNT_KEYS)
    if unknown:
        raise DataError(
            f"{where}: unknown count keys {sorted(unknown)}; the manifest uses {', '.join(COUNT_KEYS)}"
        )
    removed = counts.get("rows_removed") or {}
    total = counts.get("rows_out", 0) + counts.get("rows_quarantined", 0) + sum(removed.values())
    if counts.get("rows_in", 0) != total:
        raise DataError(
            f"{where}: row accounting does not add up: rows_in={counts.get('rows_in')} but rows_out + "
            f"rows_quarantined + rows_removed = {total} ({counts}); nothing was committed"
        )


def code_version() -> str:
    """The code a manifest came from: baked into images as HALA_CODE_VERSION, else git, else the package."""
    if os.environ.get("HALA_CODE_VERSION"):
        return os.environ["HALA_CODE_VERSION"]
    repo = Path(__file__).resolve().parents[3]  # shared/hala/contract/store.py -> the repository
    if (repo / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    from hala import __version__

    return __version__


def host_info() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "image": os.environ.get("HALA_IMAGE"),
        # forked from `hala run`'s warm interpreter of the environment (hala.kit.warm): same code, imports
        # done ahead
        "warm": bool(os.environ.get("HALA_WARM_SOCKET")),
    }
