"""Publish a run's models and datasets to the Hugging Face Hub (a dry run without a token or network).

hala run recipes/tiny.yaml --only publish-hala --set publish-hala.enabled=true
HF_TOKEN=... python -m stages.publish --recipe recipes/hala-paper.yaml --step publish-hala --set
publish-hala.enabled=true
"""

import sys

from hala.contract import step
from stages.publish.config import PublishConfig
from stages.publish.main import main

if __name__ == "__main__":
    sys.exit(step.run("publish", PublishConfig, main))
