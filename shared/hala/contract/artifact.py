"""Content-addressed artifacts that no recipe step names: a tiny stand-in model
(`_sources/tiny-<role>-<key>`), train's tokenized cache (`_cache/tokenized-<key>`). Their names carry the key
they are built from, so two recipes (or two checkouts) whose specs differ never share a folder. They are
committed exactly like a step (outputs in an attempt folder of their own, then the manifest by one conditional
write), found by the same predicate (`Store.committed`), read by the same `Store.localize`, and built once
however many processes or pods ask at the same time (the store's lease on the name; a second builder that got
past it loses the commit and removes its files).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from hala.contract import lease
from hala.contract.errors import TemporaryError
from hala.contract.store import ATTEMPT, MANIFEST, Store, new_attempt, prefixed


def ensure(
    store: Store, run: str, name: str, key: str, build: Callable[[str], dict[str, Any]], log: Any
) -> tuple[dict[str, Any], bool]:
    """(manifest, hit) of artifact `name` of `run` under `key`.

    When no manifest with that fingerprint and every file is there, `build(folder)` writes each output under
    `folder/<output path>` and returns the manifest (`hala.contract.store.new_manifest`, fingerprint `key`,
    paths relative to `folder`); it is committed under the lease, after a second look (another process may
    have committed it while this one waited)."""
    manifest = store.committed(run, name, key)
    if manifest is not None:
        return manifest, True
    with lease.held(store, run, name, log) as held:
        expect, current = store.manifest_state(run, name)
        if (
            current is not None
            and current.get("fingerprint") == key
            and store.outputs_present(run, name, current)
        ):
            return current, True
        attempt = new_attempt()
        attempt_dir = store.path(run, name, f"{ATTEMPT}{attempt}")
        # on a local store the builder writes into the attempt's folder itself: nothing is moved or copied
        # after
        folder = attempt_dir if store.is_local else tempfile.mkdtemp(prefix=f"hala-{name}-")
        won = False
        try:
            manifest = build(folder)
            if manifest.get("fingerprint") != key:
                raise AssertionError(
                    f"artifact {name}: built under fingerprint {manifest.get('fingerprint')}, asked for {key}"
                )
            rels = [f["path"] for out in manifest["outputs"].values() for f in out.get("files", [])]
            if store.is_local:
                store.sync(folder, rels)
            else:
                store.upload(folder, rels, attempt_dir)
            manifest = {
                **manifest,
                "outputs": prefixed(manifest["outputs"], f"{ATTEMPT}{attempt}"),
                "attempt": attempt,
                "lease": held.stamp(),
            }
            held.check()  # a holder that knows it lost its lease commits nothing
            winner = store.publish(store.path(run, name, MANIFEST), manifest, expect)
            if winner is not None and winner.get("fingerprint") == key:
                log.info("cached", artifact=name, lost_to=f"attempt {winner.get('attempt')}")
                return winner, True
            if winner is not None:
                raise TemporaryError(
                    f"artifact {run}/{name}: another writer committed a different build meanwhile; retry"
                )
            won = True
            store.clean_work(run, name)
        finally:
            if not won:
                store.remove(attempt_dir)
            if not store.is_local:
                shutil.rmtree(folder, ignore_errors=True)
        return manifest, False
