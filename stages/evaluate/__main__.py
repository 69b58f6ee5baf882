"""Measure a model: translation quality, FP8 acceptance, or the Arabic benchmarks.

python -m stages.evaluate --recipe recipes/tiny.yaml --step evaluate-translator
hala-stage evaluate --recipe recipes/hala-paper.yaml --step evaluate-hala-9b --store s3://bucket/hala
"""

import sys

from hala.contract import step
from stages.evaluate.config import EvaluateConfig
from stages.evaluate.main import main

if __name__ == "__main__":
    sys.exit(step.run("evaluate", EvaluateConfig, main))
