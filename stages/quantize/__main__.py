"""Quantize one model and check it against its source.

python -m stages.quantize --recipe recipes/tiny.yaml --step quantize-teacher
hala-stage quantize --recipe recipes/hala-paper.yaml --step quantize-teacher --store s3://bucket/hala
"""

import sys

from hala.contract import step
from stages.quantize.config import QuantizeConfig
from stages.quantize.main import main

if __name__ == "__main__":
    sys.exit(step.run("quantize", QuantizeConfig, main))
