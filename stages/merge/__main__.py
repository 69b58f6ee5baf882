"""Merge a fine-tuned model with its base.

python -m stages.merge --recipe recipes/tiny.yaml --step merge-hala-1.2b
hala-stage merge --recipe recipes/hala-paper.yaml --step merge-hala-9b --store s3://bucket/hala
"""

import functools
import sys

from stages.merge.check import Checker  # imports no torch: the check process starts before this one does


def run() -> int:
    # The load-and-generate check's process starts first and imports transformers while this one imports
    # torch, hashes the inputs and merges.
    with Checker() as checker:
        from hala.contract import step
        from stages.merge.config import MergeConfig
        from stages.merge.main import main

        return step.run("merge", MergeConfig, functools.partial(main, checker=checker))


if __name__ == "__main__":
    sys.exit(run())
