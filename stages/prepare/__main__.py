"""Normalize one instruction set or parallel corpus.

python -m stages.prepare --recipe recipes/tiny.yaml --step prepare-lima
hala-stage prepare --recipe recipes/hala-paper.yaml --step prepare-openorca --store s3://bucket/hala
"""

import sys

from hala.contract import step
from stages.prepare.config import PrepareConfig
from stages.prepare.main import main

if __name__ == "__main__":
    sys.exit(step.run("prepare", PrepareConfig, main))
