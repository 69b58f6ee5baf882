"""One writer at a time per step (or shard, or content-addressed artifact) on a shared store: a lease.

Kubernetes can run two pods of one Job index at once (a node that stops answering, a replaced pod) and two
people can run `hala run` on one store. The lease makes the second writer wait while the first one works, then
find the step committed (exit 0, nothing recomputed) or, if the first one failed, resume its work area. It
saves work; it is not what keeps the result right: every commit is one conditional write (hala.contract.cas),
so a writer that lost its lease without knowing it (a paused pod, a partitioned node) cannot replace what
another committed.

    <store>/<run>/_leases/<name>.lock
        a local or network file system: flock(2), which the kernel drops when the holder dies (NFS maps it to
        its own locks); never deleted, because a waiter may hold the old file open. The holder's record
        (token, pid) is written into the file; check() reads it back through the path, so a holder whose lock
        was broken (the file removed, an NFS lock reclaimed after a partition and given to another) finds
        another token there and stops
    <store>/<run>/_leases/<name>.json
        an object store: an object created if absent (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`),
        renewed every TTL/4 if unchanged (`If-Match` on its ETag, `ifGenerationMatch` on its generation),
        deleted if unchanged at the end (the pattern of Terraform's S3 lock file and of Delta Lake's S3
        commits)

A holder that dies leaves its lease object behind. A waiter takes it over once it has not changed for a TTL
measured on the waiter's own clock (no trust in clocks across machines), or at once when the holder was a
process on this same machine, in this same PID namespace, that no longer exists. The takeover is itself
conditional, so two waiters cannot both win. A holder that could not renew for most of a TTL stops (exit 75)
at its next check: before each chunk it commits, and right before its commit. A renewal whose request took
effect but whose answer was lost (the client's retry then meets a changed object) finds its own token there
and goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from hala.contract import cas
from hala.contract.errors import TemporaryError
from hala.contract.store import Store, now

LEASES = "_leases"


def ttl_seconds() -> float:
    """How long a lease lives without renewal (HALA_LEASE_TTL, default 60 s): a waiter takes over a lease that
    has not changed for this long. Long enough for a renewal to get through the client's retries (5
    attempts)."""
    return float(os.environ.get("HALA_LEASE_TTL", "60"))


def _identity() -> dict[str, Any]:
    def read(path: str) -> str | None:
        try:
            return os.readlink(path) if path.startswith("/proc/self/ns") else open(path).read().strip()
        except OSError:
            return None

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": read("/proc/self/ns/pid"),
        "boot_id": read("/proc/sys/kernel/random/boot_id"),
    }


def _gone(holder: dict[str, Any]) -> bool:
    """The holder ran on this machine, in this PID namespace, and its process no longer exists."""
    me = _identity()
    if (
        not holder
        or any(holder.get(k) != me[k] for k in ("host", "pid_namespace", "boot_id"))
        or me["boot_id"] is None
    ):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
        if holder
        else "another process"
    )


class Lease:
    """Taken by `held()`; `check()` before each commit."""

    def __init__(self, store: Store, run: str, name: str, ttl: float):
        self.store, self.name, self.ttl = store, name, ttl
        self.token = uuid.uuid4().hex
        self.record = {**_identity(), "token": self.token, "name": name, "since": now(), "ttl": ttl}
        self.waited_for: dict[str, Any] | None = None  # the holder this one waited for, if any
        self.taken_over: dict[str, Any] | None = None  # the stale holder this one replaced, if any
        self.path = store.path(run, LEASES, name + (".lock" if store.is_local else ".json"))

    def check(self) -> None:
        """Raise TemporaryError (exit 75) when this process may no longer hold the lease."""

    def stamp(self) -> dict[str, Any]:
        """What the commit's manifest records of the lease it was made under."""
        return {}

    def release(self) -> None: ...

    def _lost(self, why: str) -> TemporaryError:
        return TemporaryError(
            f"lost the lease {self.store.uri(self.path)}: {why}; nothing was committed by this "
            "process (another writer may have taken over): rerun the step"
        )


class Busy(Exception):
    """held(wait=False): another live process holds the lease."""


class _FileLease(Lease):
    def acquire(self, log: Any, poll: float, wait: bool = True) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    os.close(self.fd)
                    raise Busy(describe(self._holder())) from None
                self._wait(log, self._holder())
                time.sleep(poll)
        self.inode = os.fstat(self.fd).st_ino
        os.ftruncate(self.fd, 0)
        # who holds it, for the waiters' messages and check()
        os.pwrite(self.fd, json.dumps(self.record).encode(), 0)
        os.fsync(self.fd)

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}

    def _wait(self, log: Any, holder: dict[str, Any]) -> None:
        if self.waited_for is None:
            self.waited_for = holder
            log.info("waiting for another writer", lease=self.name, holder=describe(holder))

    def check(self) -> None:
        """The lock file at the lease's path is still the one this process locked, and still names this
        holder: read through the path, not the descriptor (on NFS a fresh open revalidates what another client
        changed)."""
        try:
            with open(self.path, "rb") as f:
                inode, body = os.fstat(f.fileno()).st_ino, f.read(4096)
        except FileNotFoundError:
            raise self._lost("its lock file was removed") from None
        try:
            holder = json.loads(body or b"{}")
        except ValueError:
            holder = {}
        if inode != self.inode or holder.get("token") != self.token:
            raise self._lost(f"its lock file now names {describe(holder)}")

    def stamp(self) -> dict[str, Any]:
        return {"kind": "flock", "inode": self.inode, "pid": os.getpid(), "token": self.token}

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if self._holder().get("token") == self.token:
                os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the flock


class _ObjectLease(Lease):
    """A lease object written with conditional requests (hala.contract.cas): S3's ETag, GCS's generation."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.fs = self.store.fs
        self.version: str | None = None
        self.lost: str | None = None
        self.lost_reason = "no answer"  # the last renewal's error, for check()'s message
        self.renewed = time.monotonic()
        self.stop = threading.Event()
        self.body = b""

    def _write(self, expect: str | None) -> str:
        """Write the lease (created if absent, or replaced if still at `expect`); its new version.
        cas.Conflict when another writer got there first, unless what is there is this holder's own write,
        whose answer was lost."""
        body = json.dumps({**self.record, "renewed": now()}).encode()
        try:
            version = cas.write(self.fs, self.path, body, expect)
        except cas.Conflict:
            version = cas.owned(self.fs, self.path, body)
            if version is None:
                raise
        self.body = body
        return version

    def _read(self) -> tuple[str | None, dict[str, Any]]:
        """(version, record) of the lease object; (None, {}) when there is none."""
        version, body = cas.read(self.fs, self.path)
        if version is None:
            return None, {}
        try:
            return version, json.loads(body or b"{}")
        except ValueError:  # half a record cannot happen with one PUT; treat it as a lease of unknown holder
            return version, {}

    # --- the protocol -------------------------------------------------------------------------------

    def acquire(self, log: Any, poll: float, wait: bool = True) -> None:
        # (version, when this process first saw it) of the holder's lease
        seen: tuple[str, float] | None = None
        while True:
            try:
                self.version = self._write(None)
                break
            except cas.Conflict:
                pass
            version, holder = self._read()
            if version is None:
                continue  # released between the two requests
            if holder.get("token") == self.token:  # our create went through and its answer was lost
                self.version = version
                break
            if not wait and not _gone(holder):
                raise Busy(describe(holder))
            if seen is None or seen[0] != version:
                seen = (version, time.monotonic())  # renewed: alive
            if self.waited_for is None:
                self.waited_for = holder
                log.info("waiting for another writer", lease=self.name, holder=describe(holder))
            stale = time.monotonic() - seen[1] > float(holder.get("ttl") or self.ttl)
            if stale or _gone(holder):
                try:
                    self.version = self._write(version)
                except cas.Conflict:
                    seen = None
                    continue
                self.taken_over = holder
                log.warning(
                    "took over a lease its holder stopped renewing", lease=self.name, holder=describe(holder)
                )
                break
            time.sleep(poll)
        self.renewed = time.monotonic()
        self.thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
        self.thread.start()

    def _renew_loop(self) -> None:
        while not self.stop.wait(self.ttl / 4):
            try:
                self.version = self._write(self.version)
                self.renewed = time.monotonic()
            except cas.Conflict:
                self.lost = "another writer replaced it"
                return
            except Exception as e:  # noqa: BLE001 - the store did not answer: try again; check() decides
                self.lost_reason = f"{type(e).__name__}: {e}"

    def check(self) -> None:
        if self.lost is None and time.monotonic() - self.renewed > 0.75 * self.ttl:
            self.lost = f"it was not renewed for {time.monotonic() - self.renewed:.0f} s ({self.lost_reason})"
        if self.lost:
            raise self._lost(self.lost)

    def stamp(self) -> dict[str, Any]:
        return {"kind": cas.kind(self.fs), "version": self.version, "token": self.token}

    def release(self) -> None:
        self.stop.set()
        if getattr(self, "thread", None) is not None:
            self.thread.join(timeout=self.ttl)
        if self.lost or self.version is None:
            return
        with contextlib.suppress(Exception):  # a lease left behind costs a waiter one TTL, not correctness
            cas.delete(self.fs, self.path, self.version)


@contextlib.contextmanager
def held(
    store: Store, run: str, name: str, log: Any, poll: float | None = None, wait: bool = True
) -> Iterator[Lease]:
    """Hold the lease `name` of `run` on `store` for the block, waiting while another live process holds it
    (or, with `wait=False`, raising Busy at once; `hala gc` skips what a writer is working on)."""
    ttl = ttl_seconds()
    lease: Any = (_FileLease if store.is_local else _ObjectLease)(store, run, name, ttl)
    lease.acquire(log, poll if poll is not None else min(2.0, ttl / 8), wait)
    try:
        yield lease
    finally:
        lease.release()
