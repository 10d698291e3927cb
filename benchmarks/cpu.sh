#!/usr/bin/env bash
# The CPU figures of docs/performance.md: ResNet-50 and ConvNeXt-Small, fp32, batch 8, 224 px,
# sparse implementation reference vs fast, for the encoder alone (forward + backward), the
# densify + decoder + loss alone, and the full training step; each variant's peak memory from
# a child process. About 15 minutes on 2 cores. JSON lines to $OUT/cpu.jsonl, a table to stdout.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-runs/cpu-bench}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/cpu.jsonl"
: > "$LOG"
for model in resnet50 convnext_small; do
  python3 benchmarks/step.py --model "$model" --batch 8 --size 224 --device cpu --steps "${STEPS:-5}" --warmup 2 \
    --variants reference,fast --parts encoder,decoder,step | tee -a "$LOG"
done
python3 benchmarks/table.py "$LOG"
