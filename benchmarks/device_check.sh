#!/usr/bin/env bash
# One GPU session: versions, sparse-encoder correctness on CUDA, then full-step timings
# (batch 128, 224 px) for ResNet-50 and ConvNeXt-Small in fp32 and bf16. JSON lines on stdout.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, torchvision; print(torch.__version__, torchvision.__version__, timm.__version__)"
python3 benchmarks/cuda_check.py --models resnet50 convnext_small efficientnet_b0
for model in resnet50 convnext_small; do
  for precision in fp32 bf16; do
    python3 benchmarks/step.py --model "$model" --batch "${BATCH:-128}" --size 224 --device cuda \
      --precision "$precision" --steps "${STEPS:-10}" --warmup 3
  done
done
