"""A crash at a store operation, then a rerun, for each kind of commit on each store: a sample of the points
that bench/crashpoints.py tries all of (tests/_lib/crashcases.py says what a kind is and what "healed" means).

The points are drawn from the sequence's own count of operations, with a seed (HALA_CRASH_SEED, default fixed)
so a failure is reproduced by running the same test again; bench/README.md keeps the totals of every point.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import crashcases

SEED = os.environ.get("HALA_CRASH_SEED", "32")
# per kind and store in CI: one kill; the sharded step (the longest sequence) also an I/O error whose answer
# is lost
POINTS = {"step": 1, "artifact": 1, "sharded": 2}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The machine cache of tiny stand-ins `hala test` shares between suites, else one of this module's
    own."""
    return Path(os.environ.get("HALA_TINY_CACHE") or tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("store", crashcases.STORES)
@pytest.mark.parametrize("kind", crashcases.KINDS)
def test_a_crash_at_a_store_operation_heals_on_the_rerun(
    tmp_path: Path, kind: str, store: str, tiny_cache: Path
) -> None:
    with crashcases.store(store) as where:
        ref = tmp_path / "reference"
        total, expected = crashcases.reference(
            kind, ref, where.url_for(ref), where.env, tiny_cache, where.root(ref)
        )
        assert total > 3 and expected, "the uninterrupted run made store operations and committed something"
        rng = random.Random(f"{SEED}-{kind}-{store}")
        points = sorted(rng.sample(range(1, total + 1), POINTS[kind]))
        modes = ["kill", "raise-after"]
        for at, mode in zip(points, modes):
            folder = tmp_path / f"{mode}-{at}"
            trial = crashcases.trial(
                kind,
                folder,
                where.url_for(folder),
                where.env,
                tiny_cache,
                where.root(folder),
                at,
                mode,
                expected,
            )
            assert trial.healed, f"{kind} on {store}, {mode} at operation {at} of {total}: {trial.why}"


def test_two_writers_with_one_frozen_past_its_lease_commit_once(tmp_path: Path, tiny_cache: Path) -> None:
    """bench/two_writers.py's pair (20 per store there), once per store: one commit, its files all there."""
    rng = random.Random(f"{SEED}-pairs")
    for store in crashcases.STORES:
        with crashcases.store(store) as where:
            ref = tmp_path / f"{store}-reference"
            total, _ = crashcases.reference(
                "step", ref, where.url_for(ref), where.env, tiny_cache, where.root(ref)
            )
            result = crashcases.pair(where, tmp_path / f"{store}-pair", tiny_cache, total, rng)
            assert result["ok"], (store, result)
