#!/usr/bin/env bash
# The wheels bench/gpu_train.py needs on a GPU machine that has PyTorch, transformers and accelerate but
# no TRL, no datasets and no package registry (the lent H100/H200 here). Run where pip reaches PyPI:
#
#   bash bench/fetch_gpu_wheels.sh            # -> bench/wheels/ (git-ignored, ~1.5 MB)
#
# and on the GPU machine, with bench/wheels carried along:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/wheels/*.whl
#   PYTHONPATH=/tmp/site python3 bench/gpu_train.py
#
# Same versions as stages/train/requirements.txt; dill and multiprocess are what datasets adds to such a machine.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la wheels
