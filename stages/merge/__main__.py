"""Merge a fine-tuned model with its base.

    python -m stages.merge --recipe recipes/tiny.yaml --step merge-hala-1.2b
    hala-stage merge --recipe recipes/hala-paper.yaml --step merge-hala-9b --store s3://bucket/hala
"""

import sys

from hala import step
from stages.merge.config import MergeConfig
from stages.merge.main import main

if __name__ == "__main__":
    sys.exit(step.run("merge", MergeConfig, main))
