#!/usr/bin/env bash
# GPU check of the pre-training pipeline: the demo recipe on CUDA with fp16 (gradient scaler),
# then bf16 + channels_last + torch.compile; export of the result. JSON lines on stdout.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-/tmp}/pipeline"
common=(--config demo --device cuda --epochs 2 --batch-size 32 --progress false --workers 4)
python3 -m sparkmim pretrain "${common[@]}" --precision fp16 --out "$OUT_DIR/fp16" | tail -n 1
python3 -m sparkmim pretrain "${common[@]}" --precision bf16 --channels-last true --compile true \
  --out "$OUT_DIR/bf16_compile" | tail -n 1
python3 -m sparkmim export "$OUT_DIR/bf16_compile" | tail -n 1
