#!/usr/bin/env bash
# One GPU session: versions, sparse-encoder correctness on CUDA (both implementations), the
# captured (CUDA graph) step against the eager step, then the timing matrix of benchmarks/gpu.sh.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/cuda_check.py --models resnet50 convnext_small efficientnet_b0
# the captured step against the eager one on this card: same weights after replays
python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k "captured" 2>&1 | tail -3
python3 benchmarks/cuda_capture_check.py
bash benchmarks/gpu.sh
