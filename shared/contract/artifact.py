"""Content-addressed artifacts that no recipe step names: a tiny stand-in model (`_sources/tiny-<role>`), train's
tokenized cache (`_cache/tokenized-<key>`). They are committed exactly like a step (outputs, then the manifest, by
`Store.commit`), found by the same predicate (`Store.committed`), read by the same `Store.localize`, and built once
however many processes or pods ask at the same time (the store's lease on the name).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

from hala.contract import lease
from hala.contract.store import Store


def ensure(store: Store, run: str, name: str, key: str, build: Callable[[str], dict[str, Any]], log: Any) -> tuple[dict[str, Any], bool]:
    """(manifest, hit) of artifact `name` of `run` under `key`.

    When no manifest with that fingerprint and every file is there, `build(folder)` writes each output under
    `folder/<output path>` and returns the manifest (`hala.contract.store.new_manifest`, fingerprint `key`); it is committed
    under the lease, after a second look (another process may have committed it while this one waited)."""
    manifest = store.committed(run, name, key)
    if manifest is not None:
        return manifest, True
    with lease.held(store, run, name, log) as held:
        manifest = store.committed(run, name, key)
        if manifest is not None:
            return manifest, True
        folder = tempfile.mkdtemp(prefix=f"hala-{name}-")
        try:
            manifest = build(folder)
            if manifest.get("fingerprint") != key:
                raise AssertionError(f"artifact {name}: built under fingerprint {manifest.get('fingerprint')}, asked for {key}")
            moves = [(os.path.join(folder, out["path"]), out["path"]) for out in manifest["outputs"].values()
                     if os.path.exists(os.path.join(folder, out["path"]))]
            held.check()  # a holder that lost its lease must not commit over the new holder
            store.commit(run, name, moves, True, manifest)
            store.clean_work(run, name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return manifest, False
