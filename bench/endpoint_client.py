"""The endpoint engine's client, measured: CPU time and wall time per chat-completions request of aiohttp
(what hala.kit.endpoint uses), httpx and openai's AsyncOpenAI, against one local server in another process.

    .venvs/serve/bin/python bench/endpoint_client.py [--requests 3000] [--concurrency 32]

The server is the tests' stand-in (tests/_lib/openaiserver.py, no faults) in a subprocess, so the client's
process time is the client's alone: JSON encoding, HTTP framing, the connection pool, the event loop. What a
shard spends per request beside the model; figures in bench/README.md ("endpoint_client.py").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER = """
import sys, time
sys.path.insert(0, {lib!r})
from openaiserver import ModelServer
with ModelServer(model="m", max_requests=10**7, seconds=3600) as s:
    print(s.url, flush=True)
    sys.stdin.read()
"""
BODY = {
    "model": "m",
    "messages": [
        {"role": "user", "content": "Translate everything that follows into Arabic:\n\nThe cat sleeps."}
    ],
    "temperature": 0.0,
    "max_tokens": 64,
}


async def with_aiohttp(url: str, n: int, concurrency: int) -> None:
    import aiohttp

    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one() -> None:
            async with slots, session.post(f"{url}/v1/chat/completions", data=json.dumps(BODY)) as r:
                json.loads(await r.read())["choices"][0]

        await asyncio.gather(*(one() for _ in range(n)))


async def with_httpx(url: str, n: int, concurrency: int) -> None:
    import httpx

    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> None:
            async with slots:
                r = await client.post(f"{url}/v1/chat/completions", content=json.dumps(BODY))
                json.loads(r.content)["choices"][0]

        await asyncio.gather(*(one() for _ in range(n)))


async def with_openai(url: str, n: int, concurrency: int) -> None:
    import httpx
    from openai import AsyncOpenAI

    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = AsyncOpenAI(
        base_url=f"{url}/v1", api_key="none", max_retries=0, http_client=httpx.AsyncClient(limits=limits)
    )

    async def one() -> None:
        async with slots:
            r = await client.chat.completions.create(**BODY)
            assert isinstance(r.choices[0].message.content, str)

    await asyncio.gather(*(one() for _ in range(n)))
    await client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(lib=str(REPO / "tests" / "_lib"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    url = server.stdout.readline().strip()
    results = {}
    try:
        for name, fn in (("aiohttp", with_aiohttp), ("httpx", with_httpx), ("openai", with_openai)):
            asyncio.run(fn(url, 200, args.concurrency))  # warm: imports, connections
            cpu0, t0 = time.process_time(), time.perf_counter()
            asyncio.run(fn(url, args.requests, args.concurrency))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            results[name] = {
                "client_cpu_ms_per_request": round(1000 * cpu / args.requests, 3),
                "wall_ms_per_request": round(1000 * wall / args.requests, 3),
                "requests_per_s": round(args.requests / wall, 1),
            }
            print(name, results[name], flush=True)
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(timeout=30)
    print(json.dumps({"requests": args.requests, "concurrency": args.concurrency, "results": results}))


if __name__ == "__main__":
    main()
