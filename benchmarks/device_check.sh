#!/usr/bin/env bash
# One GPU session: versions, sparse-encoder correctness on CUDA (both implementations), then
# the timing matrix of benchmarks/gpu.sh.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/cuda_check.py --models resnet50 convnext_small efficientnet_b0
bash benchmarks/gpu.sh
