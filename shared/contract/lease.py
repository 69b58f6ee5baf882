"""One writer at a time per step (or shard, or content-addressed artifact) on a shared store: a lease.

Kubernetes can run two pods of one Job index at once (a node that stops answering, a replaced pod) and two
people can run `hala run` on one store. Without a lease both write into the same work area, and a commit can
publish a manifest whose sha256 no longer matches a file the other one rewrote. With it, the second writer
waits while the first holds the lease, then finds the step committed (exit 0, nothing recomputed) or, if the
first one failed, resumes its work area.

    <store>/<run>/_leases/<name>.lock   a local or network file system: flock(2), which the kernel drops when
                                        the holder dies (NFS maps it to its own locks); never deleted, because
                                        a waiter may hold the old file open
    <store>/<run>/_leases/<name>.json   an object store: an object created with a conditional PUT
                                        (S3 `If-None-Match: *`), renewed every TTL/4 with `If-Match: <its ETag>`,
                                        deleted with `If-Match` at the end (the pattern of Terraform's S3 lock
                                        file and of Delta Lake's S3 commits)

A holder that dies leaves its lease object behind. A waiter takes it over once it has not changed for a TTL
measured on the waiter's own clock (no trust in clocks across machines), or at once when the holder was a
process on this same machine, in this same PID namespace, that no longer exists. The takeover is itself
conditional (`If-Match` on the stale ETag), so two waiters cannot both win. A holder that could not renew for
most of a TTL stops before it commits (exit 75): by then a waiter may have taken over, and its own result is
not worth a second manifest.

On a store whose client has no conditional write (fsspec's generic path: gcsfs today, `memory://`) creation is
still exclusive where the client supports `mode="create"` (gcsfs sends ifGenerationMatch=0), but renewal and
takeover read then write: a race of two takeovers there is possible, not one of two first writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from hala.contract.errors import TemporaryError
from hala.contract.store import Store, now

LEASES = "_leases"


def ttl_seconds() -> float:
    """How long a lease lives without renewal (HALA_LEASE_TTL, default 60 s): a waiter takes over a lease that has
    not changed for this long. Long enough for a renewal to get through the client's retries (5 attempts)."""
    return float(os.environ.get("HALA_LEASE_TTL", "60"))


def _identity() -> dict[str, Any]:
    def read(path: str) -> str | None:
        try:
            return os.readlink(path) if path.startswith("/proc/self/ns") else open(path).read().strip()
        except OSError:
            return None

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": read("/proc/self/ns/pid"),
            "boot_id": read("/proc/sys/kernel/random/boot_id")}


def _gone(holder: dict[str, Any]) -> bool:
    """The holder ran on this machine, in this PID namespace, and its process no longer exists."""
    me = _identity()
    if not holder or any(holder.get(k) != me[k] for k in ("host", "pid_namespace", "boot_id")) or me["boot_id"] is None:
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder else "another process"


class Lease:
    """Taken by `held()`; `check()` before committing."""

    def __init__(self, store: Store, run: str, name: str, ttl: float):
        self.store, self.name, self.ttl = store, name, ttl
        self.token = uuid.uuid4().hex
        self.record = {**_identity(), "token": self.token, "name": name, "since": now(), "ttl": ttl}
        self.waited_for: dict[str, Any] | None = None  # the holder this one waited for, if any
        self.taken_over: dict[str, Any] | None = None  # the stale holder this one replaced, if any
        self.path = store.path(run, LEASES, name + (".lock" if store.is_local else ".json"))

    def check(self) -> None:
        """Raise TemporaryError (exit 75) when this process may no longer hold the lease."""

    def release(self) -> None: ...


class _FileLease(Lease):
    def acquire(self, log: Any, poll: float) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                self._wait(log, self._holder())
                time.sleep(poll)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.record).encode(), 0)  # who holds it, for the waiters' messages

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}

    def _wait(self, log: Any, holder: dict[str, Any]) -> None:
        if self.waited_for is None:
            self.waited_for = holder
            log.info("waiting for another writer", lease=self.name, holder=describe(holder))

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the flock


class _ObjectLease(Lease):
    """A lease object written with conditional requests. S3's are used through s3fs's call_s3 (its retries
    included); other clients go through fsspec's generic calls (see the module docstring)."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.fs = self.store.fs
        self.s3 = hasattr(self.fs, "call_s3")
        self.etag: str | None = None
        self.lost: str | None = None
        self.lost_reason = "no answer"  # the last renewal's error, for check()'s message
        self.renewed = time.monotonic()
        self.stop = threading.Event()

    # --- the object ---------------------------------------------------------------------------------

    def _body(self) -> bytes:
        return json.dumps({**self.record, "renewed": now()}).encode()

    def _put(self, *, create: bool = False, if_match: str | None = None) -> str:
        """Write the lease; its new ETag. _Conflict when the condition does not hold."""
        body = self._body()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            cond = {"IfNoneMatch": "*"} if create else {"IfMatch": if_match}
            try:
                return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **cond)["ETag"]
            except Exception as e:  # noqa: BLE001 - a failed condition is an answer, anything else propagates
                if _is_conflict(e):
                    raise _Conflict from e
                raise
        if create:
            try:
                self.fs.pipe_file(self.path, body, mode="create")
            except FileExistsError:
                raise _Conflict from None
        else:
            if self._read()[0] != if_match:
                raise _Conflict
            self.fs.pipe_file(self.path, body)
        return hashlib.sha256(body).hexdigest()

    def _read(self) -> tuple[str | None, dict[str, Any]]:
        """(ETag, record) of the lease object; (None, {}) when there is none."""
        try:
            if self.s3:
                etag, body = _s3_get(self.fs, self.path)
                return etag, json.loads(body or b"{}")
            body = self.fs.cat_file(self.path)
            return hashlib.sha256(body).hexdigest(), json.loads(body or b"{}")
        except FileNotFoundError:
            return None, {}
        except ValueError:  # half a record cannot happen with one PUT; treat it as a lease of unknown holder
            return "unreadable", {}

    # --- the protocol -------------------------------------------------------------------------------

    def acquire(self, log: Any, poll: float) -> None:
        seen: tuple[str, float] | None = None  # (ETag, when this process first saw it) of the holder's lease
        while True:
            try:
                self.etag = self._put(create=True)
                break
            except _Conflict:
                pass
            etag, holder = self._read()
            if etag is None:
                continue  # released between the two requests
            if holder.get("token") == self.token:  # our create went through and its answer was lost; a retry met it
                self.etag = etag
                break
            if seen is None or seen[0] != etag:
                seen = (etag, time.monotonic())  # renewed: alive
            if self.waited_for is None:
                self.waited_for = holder
                log.info("waiting for another writer", lease=self.name, holder=describe(holder))
            stale = time.monotonic() - seen[1] > float(holder.get("ttl") or self.ttl)
            if stale or _gone(holder):
                try:
                    self.etag = self._put(if_match=etag)
                except _Conflict:
                    seen = None
                    continue
                self.taken_over = holder
                log.warning("took over a lease its holder stopped renewing", lease=self.name, holder=describe(holder))
                break
            time.sleep(poll)
        self.renewed = time.monotonic()
        self.thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
        self.thread.start()

    def _renew_loop(self) -> None:
        while not self.stop.wait(self.ttl / 4):
            try:
                self.etag = self._put(if_match=self.etag)
                self.renewed = time.monotonic()
            except _Conflict:
                self.lost = "another writer replaced it"
                return
            except Exception as e:  # noqa: BLE001 - the store did not answer: try again; check() decides
                self.lost_reason = f"{type(e).__name__}: {e}"

    def check(self) -> None:
        if self.lost is None and time.monotonic() - self.renewed > 0.75 * self.ttl:
            self.lost = (f"it was not renewed for {time.monotonic() - self.renewed:.0f} s "
                         f"({self.lost_reason})")
        if self.lost:
            raise TemporaryError(f"lost the lease {self.store.uri(self.path)}: {self.lost}; nothing was committed by this "
                                 "process (another writer may have taken over): rerun the step")

    def release(self) -> None:
        self.stop.set()
        if getattr(self, "thread", None) is not None:
            self.thread.join(timeout=self.ttl)
        if self.lost or self.etag is None:
            return
        with contextlib.suppress(Exception):  # a lease left behind costs a waiter one TTL, not correctness
            if self.s3:
                bucket, key, _ = self.fs.split_path(self.path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
            elif self._read()[0] == self.etag:
                self.fs.rm_file(self.path)


class _Conflict(Exception):
    """A conditional write's condition did not hold: someone else wrote the lease."""


def _is_conflict(exc: BaseException) -> bool:
    """412 PreconditionFailed, or 409 ConditionalRequestConflict (S3: two conditional writes of one key at once)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        code = (getattr(seen, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return True
        seen = seen.__cause__
    return False


def _s3_get(fs: Any, path: str) -> tuple[str, bytes]:
    """ETag and body of one object in one GET (s3fs's retries included), on s3fs's event loop."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[str, bytes]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            return resp["ETag"], await body.read()

    return sync(fs.loop, get)


@contextlib.contextmanager
def held(store: Store, run: str, name: str, log: Any, poll: float | None = None) -> Iterator[Lease]:
    """Hold the lease `name` of `run` on `store` for the block, waiting while another live process holds it."""
    ttl = ttl_seconds()
    lease: Any = (_FileLease if store.is_local else _ObjectLease)(store, run, name, ttl)
    lease.acquire(log, poll if poll is not None else min(2.0, ttl / 8))
    try:
        yield lease
    finally:
        lease.release()
