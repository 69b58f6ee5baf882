"""Translate a prepared dataset (or one shard of it) with an LLM.

python -m stages.translate --recipe recipes/tiny.yaml --step translate-openorca-teacher
hala-stage translate --recipe recipes/hala-paper.yaml --step translate-hermes3 --shard 3/32
(on Kubernetes, an Indexed Job sets JOB_COMPLETION_INDEX; then `hala gather RECIPE STEP`)
"""

import sys

from hala.contract import step
from stages.translate.config import TranslateConfig
from stages.translate.main import main

if __name__ == "__main__":
    sys.exit(step.run("translate", TranslateConfig, main))
