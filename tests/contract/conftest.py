"""Fixtures of the contract suite: a real S3 API on 127.0.0.1 (moto's server), started once, stopped after."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import s3server
from helpers import free_port

if TYPE_CHECKING:
    from faultproxy import FaultProxy

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "hala-test",
    "AWS_SECRET_ACCESS_KEY": "hala-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# short waits for the tests; fsspec's own configuration wins over the store's deliberate defaults
QUICK = json.dumps(
    {
        "config_kwargs": {
            "retries": {"mode": "standard", "total_max_attempts": 2},
            "connect_timeout": 2,
            "read_timeout": 10,
        }
    }
)
BUCKET = "hala-store"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3 API on 127.0.0.1 serving one request at a time (s3server.py says why); its endpoint URL. Bounded:
    it serves this session's requests and stops with it."""
    server, _ = s3server.make(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def s3(s3_server: str) -> Iterator[dict[str, str]]:
    """The environment that points s3fs at the server (standard variables only), with a bucket
    `hala-store`."""
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_server, "FSSPEC_S3": QUICK}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def proxy(s3: dict[str, str]) -> Iterator[FaultProxy]:
    """A fault proxy (tests/_lib/faultproxy.py) in front of the S3 server, faultless until a test sets its
    rates."""
    from faultproxy import FaultProxy

    p = FaultProxy(s3["AWS_ENDPOINT_URL"], seed=16, stall_s=2.0).start()
    try:
        yield p
    finally:
        p.stop()
