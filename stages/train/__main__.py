"""Fine-tune a model with TRL's SFTTrainer.

    python -m stages.train --recipe recipes/tiny.yaml --step train-translator
    hala-stage train --recipe recipes/hala-paper.yaml --step train-hala-9b --store s3://bucket/hala

A step with `accelerate: ddp|fsdp` and `processes: N` relaunches itself under `accelerate launch` with the
stage's config for it (stages/train/accelerate/) when N GPUs are there; elsewhere it runs as one process.
"""

import sys

from hala.contract import step
from stages.train.config import TrainConfig
from stages.train.launch import relaunch
from stages.train.main import main

if __name__ == "__main__":
    relaunch(sys.argv[1:])
    sys.exit(step.run("train", TrainConfig, main))
