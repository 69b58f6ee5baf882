"""A real S3 API on 127.0.0.1 for tests and CI: moto's server (s3fs, aiobotocore and botocore run their real
code over HTTP), serving one request at a time.

    python tests/_lib/s3server.py --port 9555 --bucket hala-ci --seconds 3600  # CI: in the background

S3 applies a conditional write (If-None-Match / If-Match) atomically; moto's handler checks, then writes, and
its threaded server could interleave two of them. Serving one request at a time gives the ordering S3 gives,
so what runs against it sees our code's behaviour and not a race inside the stand-in. Bounded: it listens on
loopback only, and the command-line server stops after --seconds or --requests, whichever comes first.
"""

from __future__ import annotations

import argparse
import threading
from typing import Any


class OneAtATime:
    def __init__(self, app: Any, limit: int | None = None):
        self.app, self.lock, self.limit, self.served = app, threading.Lock(), limit, 0
        self.exhausted = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self.lock:
            self.served += 1
            if self.limit is not None and self.served >= self.limit:
                self.exhausted.set()
            return list(self.app(environ, start_response))


def make(port: int = 0, limit: int | None = None) -> tuple[Any, OneAtATime]:
    """(werkzeug server on 127.0.0.1, its app); call serve_forever() in a thread, shutdown() to stop."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = OneAtATime(DomainDispatcherApplication(create_backend_app), limit)
    return make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler), app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bucket", action="append", default=[], help="created at start (repeatable)")
    p.add_argument("--seconds", type=float, default=3600, help="stop after this long")
    p.add_argument("--requests", type=int, default=2_000_000, help="stop after this many requests")
    args = p.parse_args()
    server, app = make(args.port, args.requests)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    if args.bucket:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{args.port}",
            region_name="us-east-1",
            aws_access_key_id="ci",
            aws_secret_access_key="ci",
        )
        for bucket in args.bucket:
            s3.create_bucket(Bucket=bucket)
    print(
        f"s3 server on http://127.0.0.1:{args.port} (buckets: {', '.join(args.bucket) or 'none'})", flush=True
    )
    app.exhausted.wait(timeout=args.seconds)
    server.shutdown()
    thread.join(timeout=10)
    print(f"s3 server stopped after {app.served} requests", flush=True)


if __name__ == "__main__":
    main()
