"""Conditional writes on every store: create-if-absent and replace-if-unchanged, each one request (or one
system call), so that of two writers exactly one wins whatever the timing, with no lock held between them.

    version = create(fs, path, data)           # Conflict if the object exists
    version = replace(fs, path, data, expect)  # Conflict unless the object is still at version `expect`
    version, data = read(fs, path)             # (None, None) when there is none
    delete(fs, path, expect)                   # Conflict unless it is still at `expect`; gone already is fine

A version is what the store itself tells writes apart by: S3's ETag (`If-None-Match: *`, `If-Match`), GCS's
generation (`ifGenerationMatch`, on multipart uploads, the ones every server enforces), and on a local or
network file system the sha256 of the bytes. There, `create` is `link(2)` of a whole, fsynced file, which
fails when the name exists (atomic on NFS too), and `replace` holds `flock(2)` on a hidden lock file beside
the object for the compare and the `rename(2)` only; the folder is fsynced after either. This is how Delta
Lake commits (put-if-absent of the next log entry) and Iceberg (compare-and-swap of a pointer), applied to our
manifests, parts and leases.

Every body written here carries a token of its writer (an attempt id, a lease token), so a write whose answer
was lost and whose retry met its own bytes (botocore retries a PUT after a 500 that took effect: the retry
gets 412) is recognised by `owned`, not taken for a loss.

Other fsspec filesystems (memory://, and any without conditional requests) get compare-then-write under a lock
of this process: exclusive within one process, not between machines; `hala` warns once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
import uuid
from typing import Any

from hala.contract.logs import get as get_log


class Conflict(Exception):
    """The condition of a conditional write did not hold: another writer got there first."""


def kind(fs: Any) -> str:
    """'local', 's3', 'gcs' or 'other': which conditional writes the filesystem offers."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return "local"
    if hasattr(fs, "call_s3"):
        return "s3"
    if type(fs).__module__.startswith("gcsfs"):
        return "gcs"
    return "other"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(fs: Any, path: str) -> tuple[str | None, bytes | None]:
    """(version, bytes) of the object; (None, None) when there is none. One request."""
    k = kind(fs)
    try:
        if k == "s3":
            return _s3_get(fs, path)
        if k == "gcs":
            bucket, key, _ = fs.split_path(path)
            headers, body = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
            return str(headers.get("X-Goog-Generation") or headers.get("x-goog-generation")), bytes(body)
        if k == "local":
            with open(path, "rb") as f:
                data = f.read()
            return digest(data), data
        data = fs.cat_file(path)
        return digest(data), data
    except (FileNotFoundError, NotADirectoryError):
        return None, None


def create(fs: Any, path: str, data: bytes) -> str:
    """Write `data` at `path` only if nothing is there; its version. Conflict otherwise."""
    k = kind(fs)
    if k == "s3":
        return _s3_put(fs, path, data, IfNoneMatch="*")
    if k == "gcs":
        return _gcs_upload(fs, path, data, 0)
    if k == "local":
        return _local_create(path, data)
    with _process_lock(fs):
        if fs.exists(path):
            raise Conflict(path)
        fs.pipe_file(path, data)
    return digest(data)


def replace(fs: Any, path: str, data: bytes, expect: str) -> str:
    """Write `data` at `path` only if the object there is still at version `expect`; its new version."""
    k = kind(fs)
    if k == "s3":
        return _s3_put(fs, path, data, IfMatch=expect)
    if k == "gcs":
        return _gcs_upload(fs, path, data, expect)
    if k == "local":
        with _local_lock(path):
            if read(fs, path)[0] != expect:
                raise Conflict(path)
            tmp = _local_whole_file(path, data)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
        return digest(data)
    with _process_lock(fs):
        if read(fs, path)[0] != expect:
            raise Conflict(path)
        fs.pipe_file(path, data)
    return digest(data)


def write(fs: Any, path: str, data: bytes, expect: str | None) -> str:
    """create() when `expect` is None (nothing was there when the writer looked), else replace()."""
    return create(fs, path, data) if expect is None else replace(fs, path, data, expect)


def owned(fs: Any, path: str, data: bytes) -> str | None:
    """After a Conflict: the object's version when it holds exactly `data` (this writer's own write, whose
    answer was lost and whose retry met it), else None (another writer's)."""
    version, current = read(fs, path)
    return version if current == data else None


def delete(fs: Any, path: str, expect: str) -> None:
    """Delete the object if it is still at version `expect`. Conflict if another writer replaced it."""
    k = kind(fs)
    try:
        if k == "s3":
            bucket, key, _ = fs.split_path(path)
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expect)
            except Exception as e:  # noqa: BLE001 - a failed condition is an answer; the rest propagates
                if is_conflict(e):
                    raise Conflict(path) from e
                raise
        elif k == "gcs":
            bucket, key, _ = fs.split_path(path)
            try:
                fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=expect)
            except FileExistsError as e:  # gcsfs raises this for 412
                raise Conflict(path) from e
        elif k == "local":
            with _local_lock(path):
                if read(fs, path)[0] != expect:
                    raise Conflict(path)
                os.unlink(path)
                _fsync_dir(os.path.dirname(path))
        else:
            with _process_lock(fs):
                if read(fs, path)[0] != expect:
                    raise Conflict(path)
                fs.rm_file(path)
    except FileNotFoundError:
        return


def is_conflict(exc: BaseException) -> bool:
    """412 PreconditionFailed, or 409 ConditionalRequestConflict (S3: two conditional writes of one key at
    once)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (FileExistsError, Conflict)):
            return True
        code = (getattr(seen, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
        seen = seen.__cause__
    return False


# --- S3 -----------------------------------------------------------------------------------------------------


def _s3_put(fs: Any, path: str, data: bytes, **condition: str) -> str:
    bucket, key, _ = fs.split_path(path)
    try:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except Exception as e:  # noqa: BLE001 - a failed condition is an answer, anything else propagates
        if is_conflict(e):
            raise Conflict(path) from e
        raise
    finally:
        fs.invalidate_cache(path)


def _s3_get(fs: Any, path: str) -> tuple[str, bytes]:
    """ETag and body in one GET (s3fs's retries included), on s3fs's event loop."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[str, bytes]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            return resp["ETag"], await body.read()

    return sync(fs.loop, get)


# --- GCS ----------------------------------------------------------------------------------------------------


def _gcs_upload(fs: Any, path: str, data: bytes, generation: int | str) -> str:
    """One multipart upload with ifGenerationMatch (0: only if absent). gcsfs's own `mode="create"` covers
    only the first case; fake-gcs-server, like GCS, enforces the condition on multipart uploads."""
    import json

    bucket, key, _ = fs.split_path(path)
    boundary = f"hala-{uuid.uuid4().hex}"
    body = (
        (
            f"--{boundary}\r\nContent-Type: application/json; "
            f"charset=UTF-8\r\n\r\n{json.dumps({'name': key})}\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--".encode()
    )
    try:
        out = fs.call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{bucket}/o",
            uploadType="multipart",
            ifGenerationMatch=str(generation),
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=body,
            json_out=True,
        )
    except FileExistsError as e:  # gcsfs raises this for 412 Precondition Failed
        raise Conflict(path) from e
    finally:
        fs.invalidate_cache(path)
    return str(out["generation"])


# --- local and network file systems
# -----------------------------------------------------------------------------


def _fsync_dir(folder: str) -> None:
    """A rename or link is durable once its folder is (ext4, XFS: the entry lives in the folder's blocks)."""
    with contextlib.suppress(
        OSError
    ):  # some file systems refuse to open a folder for fsync; the data is synced
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _local_whole_file(path: str, data: bytes) -> str:
    """`data` in a new file beside `path`, synced to disk: a hidden name of its own, created with the
    process's umask (mkstemp's 0600 would lock another user of a shared store out)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _local_create(path: str, data: bytes) -> str:
    tmp = _local_whole_file(path, data)
    try:
        # fails with EEXIST when the name is taken: the one atomic "create if absent" of POSIX
        os.link(tmp, path)
    except FileExistsError as e:
        raise Conflict(path) from e
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # a file system without hard links (some FUSE mounts): an exclusive create, then the bytes
        with _local_lock(path):
            if os.path.exists(path):
                raise Conflict(path) from None
            os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(os.path.dirname(path))
    return digest(data)


@contextlib.contextmanager
def _local_lock(path: str) -> Any:
    """flock(2) on `.<name>.lock` beside `path`, for one compare and one rename (never held across work)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f".{os.path.basename(path)}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_LOCKS: dict[int, threading.Lock] = {}
_WARNED: set[str] = set()


@contextlib.contextmanager
def _process_lock(fs: Any) -> Any:
    name = type(fs).__name__
    if name not in _WARNED and "Memory" not in name:
        _WARNED.add(name)
        get_log("hala.store").warning(
            "this store offers no conditional writes: commits are exclusive within one process "
            "only, and the lease is the only guard between machines",
            filesystem=name,
        )
    lock = _LOCKS.setdefault(id(fs), threading.Lock())
    with lock:
        yield
