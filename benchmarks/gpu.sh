#!/usr/bin/env bash
# The GPU matrix of docs/performance.md, within about 8 minutes on one H100/H200:
# ResNet-50 and ConvNeXt-Small, batch 128, 224 px, full training step, sparse implementation
# reference vs fast, fp32 vs bf16, channels_last, torch.compile of the decoder and the whole step
# captured as one CUDA graph (capture) on top; every line also gives the aten operations per step;
# then where a fast bf16 step spends its time (encoder alone, decoder alone) and the
# input-pipeline throughput. JSON lines go to $OUT/gpu.jsonl, a table to stdout.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-runs/gpu-bench}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu.jsonl"
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/card.txt"
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" | tee -a "$OUT_DIR/card.txt"
common=(--batch "${BATCH:-128}" --size 224 --device cuda --steps "${STEPS:-8}" --warmup 3)
for model in resnet50 convnext_small; do
  python3 benchmarks/step.py --model "$model" "${common[@]}" --parts step \
    --variants reference,fast,reference+bf16,fast+bf16,reference+bf16+cl,fast+bf16+cl,fast+bf16+cl+compile,fast+bf16+cl+capture \
    | tee -a "$LOG"
  python3 benchmarks/step.py --model "$model" "${common[@]}" --parts encoder,decoder \
    --variants reference+bf16,fast+bf16,fast+bf16+cl,fast+bf16+cl+dwcanvas | tee -a "$LOG"
done
python3 benchmarks/loader.py --data demo --seconds 4 --workers "${WORKERS:-0,8}" --batch 128 --pin-memory | tee -a "$LOG"
python3 benchmarks/table.py "$LOG"
