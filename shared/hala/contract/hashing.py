"""Content hashes: the identity of configs, inputs and outputs (the cache and tamper checks rest on them)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

CHUNK = 1 << 20
# hashlib releases the GIL on large updates, so files hash in parallel threads: a model's shards (or the two
# models of a merge) take one file's time per core instead of their sum
WORKERS = min(8, os.cpu_count() or 1)


def canonical_json(obj: Any) -> bytes:
    """One byte string per value: sorted keys, no whitespace, UTF-8 (so equal configs hash equal)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def sha256_file(fs: Any, path: str) -> tuple[str, int]:
    """sha256 and size of one file of an fsspec filesystem, streamed."""
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def sha256_files(fs: Any, paths: list[str]) -> list[tuple[str, int]]:
    """sha256 and size of each path, in order, several files at a time."""
    if len(paths) < 2 or WORKERS < 2:
        return [sha256_file(fs, p) for p in paths]
    with ThreadPoolExecutor(min(WORKERS, len(paths))) as pool:
        return list(pool.map(lambda p: sha256_file(fs, p), paths))


def sha256_listing(entries: Iterable[tuple[str, str]]) -> str:
    """Aggregate hash of a set of files given as (relative path, sha256): order-independent."""
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{rel}\t{digest}\n".encode())
    return h.hexdigest()


def sha256_tree(fs: Any, root: str) -> str:
    """Aggregate hash of a file or of every file under a folder (relative paths included)."""
    if fs.isfile(root):
        return sha256_file(fs, root)[0]
    root = root.rstrip("/")
    paths = sorted(fs.find(root))
    return sha256_listing(
        (p[len(root) + 1 :], digest) for p, (digest, _) in zip(paths, sha256_files(fs, paths))
    )
