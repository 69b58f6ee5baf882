"""Judge translation pairs (or one shard of them) with an LLM.

python -m stages.judge --recipe recipes/tiny.yaml --step judge-opus100
hala-stage judge --recipe recipes/hala-paper.yaml --step judge-opus100 --shard 1/4
"""

import sys

from hala.contract import step
from stages.judge.config import JudgeConfig
from stages.judge.main import main

if __name__ == "__main__":
    sys.exit(step.run("judge", JudgeConfig, main))
