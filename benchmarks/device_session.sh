#!/usr/bin/env bash
# One short GPU lease: CUDA correctness of the sparse encoder (2-D and 3-D), the captured step
# against the eager step, the step matrix for ResNet-50 and ConvNeXt-S at batch 128 / 224 px,
# where a fast bf16 step spends its time, depthwise layers on the canvas or the halo, and the
# 3-D encoder in both forms against the dense model. Each part has its own time limit so one
# slow part cannot eat the lease; SECTIONS picks parts (default: all, about 6 minutes on an H200,
# plus up to 4 for 'data': the 3-D loader feeding ResEnc-L at 160^3 with 16 workers).
# JSON lines go to $OUT/session.jsonl. monai travels as a wheel in .whl/ (pure Python):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl monai==1.6.1 \
#     dynamic-network-architectures==0.4.4 einops
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SECTIONS="${SECTIONS:-check capture step canvas 3d data}"
OUT_DIR="${OUT:-runs/device-session}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/session.jsonl"
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
part() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v '^{' | grep -v Warning | tail -3; }
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
common=(--batch 128 --size 224 --device cuda --steps "${STEPS:-6}" --warmup 3)
if has check; then
  part 120 python3 benchmarks/cuda_check.py --models ${CHECK_MODELS:-resnet50 convnext_small efficientnet_b0 monai:resnet18 torchvision:r3d_18}
  grep '"check"' "$LOG"
fi
if has capture; then
  echo "== captured test"; timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k captured 2>&1 | tail -2
  part 60 python3 benchmarks/cuda_capture_check.py
fi
if has step; then
  for model in resnet50 convnext_small; do
    part 75 python3 benchmarks/step.py --model "$model" "${common[@]}" --parts step \
      --variants reference+bf16+cl,fast+bf16+cl,fast+bf16+cl+capture,fast
    part 50 python3 benchmarks/step.py --model "$model" "${common[@]}" --parts encoder,decoder \
      --variants reference+bf16+cl,fast+bf16+cl
    # the decoder + densify + loss part compiled (inductor fuses its norms and activations)
    part 120 python3 benchmarks/step.py --model "$model" "${common[@]}" --parts decoder \
      --variants fast+bf16+cl,fast+bf16+cl+compile
  done
fi
if has canvas; then  # ConvNeXt-S's 7x7 depthwise layers: tiles 8, 4, 2, 1 sites wide at strides 4-32
  part 90 python3 benchmarks/step.py --model convnext_small "${common[@]}" --parts encoder,step \
    --variants reference+bf16+cl,fast+bf16+cl+dwcanvas0,fast+bf16+cl+dwcanvas4,fast+bf16+cl+dwcanvas8,fast+bf16+cl+dwcanvas16
fi
if has 3d; then
  part 90 python3 benchmarks/encoder3d.py --device cuda --size 96 --batch 2 --rounds 5 --warmup 2
  part 90 python3 benchmarks/encoder3d.py --device cuda --size 128 --batch 8 --rounds 5 --warmup 2
  # channels_last_3d (--channels-last true for volumes; auto keeps them contiguous until this is measured)
  part 90 python3 benchmarks/encoder3d.py --device cuda --size 128 --batch 8 --rounds 5 --warmup 2 --channels-last
  # nnU-Net's ResEnc-L at the crop it is pre-trained at (needs dynamic-network-architectures and
  # einops as wheels in .whl/, like monai)
  for b in 2 8; do
    part 120 python3 benchmarks/encoder3d.py --model nnunet:resenc_l --device cuda --size 160 --batch $b \
      --rounds 3 --warmup 1 --precision bf16
  done
fi
if has data; then  # the 3-D input pipeline feeding a GPU: ResEnc-L at 160^3 from the cache, 16 workers
  part 240 python3 benchmarks/volume_loader.py --volumes 2 --seconds 8 --methods cache,nnunet \
    --run-model nnunet:resenc_l --run-crop 160 --run-batch 2 --run-workers 16 --run-steps 20 --run-device cuda
fi
python3 benchmarks/table.py "$LOG" 2>/dev/null | head -40
grep '"encoder3d"' "$LOG" | cut -c1-60,200-400
