"""`hala gather RECIPE STEP`: turn the N committed parts of a sharded step into one committed step.

Library code with no ML imports (it runs in the hala-cli image after a Kubernetes Indexed Job, or
in-process in the local runner). A pure function of the committed parts, retried from any point: it checks
that every shard committed its part (`_PART.json` under `_work/<fingerprint>/shards/`), that each part's files
are there with their recorded sizes, that every part's rows add up and so do their sums, gives the parts'
files new names in a folder of its own attempt (hard links on a local store, server-side copies on an object
store: the parts are never moved or changed), and commits the manifest by one conditional write. Cut off
anywhere before that write, it has changed nothing a retry reads; after it, only the clean-up of the work area
is left, which the retry finishes.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import structlog

from hala.contract import lease, logs, sources
from hala.contract import recipe as recipe_mod
from hala.contract.errors import ConfigError, DataError, TemporaryError
from hala.contract.store import (
    ATTEMPT,
    MANIFEST,
    PART,
    Store,
    check_counts,
    manifest_files,
    new_attempt,
    new_manifest,
    now,
    output_entry,
)


def gather(
    recipe_path: str,
    step_name: str,
    store_url: str | None = None,
    run: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """`hala gather`: load the recipe, then gather_step."""
    return gather_step(recipe_mod.load(recipe_path, overrides=overrides, store=store_url, run=run), step_name)


def gather_step(recipe: Any, step_name: str) -> dict[str, Any]:
    """Commit the parts of a sharded step of a loaded recipe (the runner and the conductor hold one
    already)."""
    log = logs.get("hala.gather")
    step = recipe.step(step_name)
    if step.spec is None:
        raise ConfigError(f"step '{step.name}': stage '{step.stage}' does not exist yet")
    if not step.spec.sharded:
        raise ConfigError(f"step '{step.name}': stage '{step.stage}' is not sharded; its step commits itself")
    # scoped: the local runner gathers in its own process, and later events must not carry this step
    with structlog.contextvars.bound_contextvars(run=recipe.run, step=step.name, stage=step.stage):
        store = Store(recipe.store)
        with lease.held(store, recipe.run, step.name, log) as held:  # two gathers of one step: one commits
            return _gather(recipe, step, store, held, log)


def _gather(recipe: Any, step: Any, store: Store, held: lease.Lease, log: Any) -> dict[str, Any]:
    resolved = sources.resolve(store, recipe, step)
    fp = sources.fingerprint(step, resolved)
    t0 = time.monotonic()
    n = step.shards
    base = store.shards_path(recipe.run, step.name, fp)
    expect, current = store.manifest_state(recipe.run, step.name)
    existing = (
        current
        if current is not None
        and current.get("fingerprint") == fp
        and store.outputs_present(recipe.run, step.name, current)
        else None
    )
    if existing is not None and not store.fs.exists(base):
        log.info("cached", fingerprint=fp[:12])
        return existing
    parts: list[dict[str, Any]] = []
    missing = []
    for i in range(n):
        part = store.read_json(f"{store.shard_path(recipe.run, step.name, fp, i, n)}/{PART}")
        if part is None or part.get("fingerprint") != fp:
            missing.append(i)
        else:
            parts.append(part)
    if existing is not None:
        used = {(p.get("shard"), p.get("attempt")) for p in (existing.get("shards") or {}).get("parts", [])}
        fresh = [p for p in parts if (p["shard"][0], p.get("attempt")) not in used]
        # The parts this manifest was gathered from (a clean-up cut short), or a forced rerun that did not
        # finish every shard: the committed result stands and the parts go. Every shard rerun (--force) is
        # committed in its place.
        if not fresh or missing:
            log.info("cached", fingerprint=fp[:12], dropped_parts=len(fresh))
            store.clean_work(recipe.run, step.name)
            return existing
    if missing:
        raise TemporaryError(
            f"step '{step.name}': {len(missing)} of {n} shards have not committed their part "
            f"(missing: {', '.join(map(str, missing[:20]))}{' …' if len(missing) > 20 else ''}); run them, "
            "then gather again"
        )
    # every part's files are there, every part adds up
    attempt = new_attempt()
    totals: dict[str, Any] = {"rows_in": 0, "rows_out": 0, "rows_quarantined": 0, "rows_removed": Counter()}
    quarantine: Counter = Counter()
    rows_by_output: Counter = Counter()
    outputs_files: dict[str, list[dict[str, Any]]] = {}
    extras: dict[str, dict[str, Any]] = {}
    folders: dict[str, str] = {}
    links: list[tuple[str, str]] = []
    for part in parts:
        i = part["shard"][0]
        part_dir = store.shard_path(recipe.run, step.name, fp, i, n)
        files = manifest_files(part, store.uri(f"{part_dir}/{PART}"))
        counts = part.get("counts")
        if counts:
            check_counts(counts, f"step '{step.name}' shard {i}")
            for key in ("rows_in", "rows_out", "rows_quarantined"):
                totals[key] += counts.get(key, 0)
            totals["rows_removed"].update(counts.get("rows_removed") or {})
        quarantine.update(part.get("quarantine", {}).get("by_reason", {}))
        sizes = store.file_sizes([f"{part_dir}/{f['path']}" for f in files])
        for name, entry in part["outputs"].items():
            rows_by_output[name] += entry.get("rows") or 0
            extras[name] = {
                k: v
                for k, v in entry.items()
                if k not in ("path", "kind", "rows", "bytes", "sha256", "files")
            }
            # the output's own folder name, under its attempt
            folder = entry["path"].rstrip("/").rsplit("/", 1)[-1]
            folders[name] = f"{ATTEMPT}{attempt}/{folder}"
            for f in entry["files"]:
                src = f"{part_dir}/{f['path']}"
                size = sizes.get(src)
                if size != f["bytes"]:
                    found = "missing" if size is None else f"{size} bytes, its part says {f['bytes']}"
                    raise DataError(
                        f"step '{step.name}' shard {i}: part file {store.uri(src)} is {found}; rerun shard "
                        f"{i}/{n} (it finds its part incomplete and commits a new one), then gather again"
                    )
                inner = (
                    f["path"][len(entry["path"]) + 1 :]
                    if f["path"].startswith(entry["path"] + "/")
                    else f["path"].rsplit("/", 1)[-1]
                )
                sub, _, fname = inner.rpartition("/")
                rel = f"{folders[name]}/{sub + '/' if sub else ''}s{i:05d}-{fname}"
                links.append((src, store.path(recipe.run, step.name, rel)))
                outputs_files.setdefault(name, []).append({**f, "path": rel})
    counts_total = None
    if any(p.get("counts") for p in parts):
        counts_total = {**totals, "rows_removed": dict(totals["rows_removed"])}
        check_counts(counts_total, f"step '{step.name}' (all {n} shards)")
    outputs = {
        name: output_entry(
            files, folders[name], step.spec.outputs[name].kind, rows_by_output[name], **extras.get(name, {})
        )
        for name, files in outputs_files.items()
    }
    manifest = new_manifest(
        run=recipe.run,
        step=step,
        fingerprint=fp,
        inputs={name: r.record() for name, r in resolved.items()},
        outputs=outputs,
        counts=counts_total,
        quarantine={"rows": sum(quarantine.values()), "by_reason": dict(sorted(quarantine.items()))},
        metrics={
            **merge_metrics([p.get("metrics", {}) for p in parts]),
            "shards": [{"shard": p["shard"][0], **p.get("metrics", {})} for p in parts],
        },
        timings={
            "started": min(p["timings"]["started"] for p in parts),
            "finished": now(),
            "seconds": round(max(p["timings"]["seconds"] for p in parts), 3),
            "shard_seconds": [p["timings"]["seconds"] for p in parts],
            "gather_seconds": round(time.monotonic() - t0, 3),
        },
        shards={
            "count": n,
            "hosts": sorted({p.get("host", {}).get("hostname", "?") for p in parts}),
            "parts": [{"shard": p["shard"][0], "attempt": p.get("attempt")} for p in parts],
        },
        attempt=attempt,
        lease=held.stamp(),
    )
    attempt_dir = store.path(recipe.run, step.name, f"{ATTEMPT}{attempt}")
    try:
        store.materialize(links)
        store.sync(
            attempt_dir,
            [rel.split("/", 1)[1] for files in outputs_files.values() for rel in (f["path"] for f in files)],
        )
        held.check()
        winner = store.publish(store.path(recipe.run, step.name, MANIFEST), manifest, expect)
    except BaseException:
        store.remove(attempt_dir)
        raise
    if winner is not None:
        store.remove(attempt_dir)
        if winner.get("fingerprint") != fp:
            raise TemporaryError(
                f"step '{step.name}': another writer committed it while this gather ran (fingerprint "
                f"{str(winner.get('fingerprint'))[:12]}, this one {fp[:12]}); gather again"
            )
        log.info("cached", fingerprint=fp[:12], lost_to=f"attempt {winner.get('attempt')}")
        return winner
    store.clean_work(recipe.run, step.name)
    log.info(
        "gathered", shards=n, counts=counts_total, attempt=attempt, seconds=round(time.monotonic() - t0, 2)
    )
    return manifest


def merge_metrics(per_shard: list[dict[str, Any]]) -> dict[str, Any]:
    """One view over the shards' metrics: counts add up, lists of names are joined, settings that agree are
    kept. Rates (`*_per_s`, `*rate`) are left per shard: how shards overlapped in time is not known here."""
    merged: dict[str, Any] = {}
    keys = {k for m in per_shard for k in m}
    for key in sorted(keys):
        values = [m[key] for m in per_shard if key in m]
        if key.endswith(("_per_s", "rate")):
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values)
        elif all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in values):
            merged[key] = sorted({x for v in values for x in v})
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
    return merged
