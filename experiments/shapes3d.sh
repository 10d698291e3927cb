#!/usr/bin/env bash
# SparK on volumes (docs/experiments.md, "SparK on volumes"): a MONAI ResNet-10 pre-trained on 2,000
# unlabelled 32^3 volumes of ten shape classes (experiments/shapes3d.py, made here), then k-NN and a
# linear probe on every stage, and a short fine-tune, against random initialisation.
#
#   bash experiments/shapes3d.sh screen      # the issue's recipe, then one pre-training per hypothesis (seed 0)
#   bash experiments/shapes3d.sh final       # screen, then seed 1, the zero-out ablation and the fine-tunes
#   bash experiments/shapes3d.sh controls    # the same recipe on digits as volumes and on 2-D middle slices
#   python experiments/summarise_stages.py runs/shapes3d/eval/base
#
# On a GPU: DEVICE=cuda EPOCHS=200 SIZE=64 DATA=data/shapes3d64 bash experiments/shapes3d.sh final.
# WORKERS sets the loader processes.
set -euo pipefail
ROOT=${ROOT:-runs/shapes3d}
DATA=${DATA:-data/shapes3d}
EPOCHS=${EPOCHS:-4}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-2}
SIZE=${SIZE:-32}  # volume side; 64 gives a 4 x 4 x 4 mask grid
[ -d "$DATA/pretrain" ] || python experiments/shapes3d.py "$DATA" --size "$SIZE"
mkdir -p "$ROOT/eval"
log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$ROOT/times.txt"; }

VOL=(--model monai:resnet10 --in-chans 1 --input-size "$SIZE" --input-depth "$SIZE" --workers "$WORKERS" --device "$DEVICE"
     --progress false)
# the recipe of the report: batch 16, lr 1e-3, warm-up 1 epoch, decoder width 128
PRE=(pretrain "${VOL[@]}" --batch-size 16 --lr 1e-3 --epochs "$EPOCHS" --warmup-epochs 1 --decoder-width 128
     --log-every-steps 25 --keep-last 4 --vis-every-epochs 2 --tensorboard false)

pretrain() {  # name flags... (on $DATA/pretrain unless --data is given)
  local name=$1; shift
  [ -f "$ROOT/$name/encoder.safetensors" ] && return
  log "pretrain $name start"
  sparkmim "${PRE[@]}" --data "$DATA/pretrain" --out "$ROOT/$name" "$@" > "$ROOT/$name.log" 2>&1
  log "pretrain $name done: $(tail -1 "$ROOT/$name.log")"
}

probe() {  # tag weights flags...: k-NN (k=10) and a 50-epoch linear probe on every stage
  local tag=$1 weights=$2; shift 2
  for mode in knn linear; do
    local out="$ROOT/eval/$tag/$mode"
    [ -f "$out/results.json" ] && continue
    mkdir -p "$out"
    local extra=(--k 10)
    [ "$mode" = linear ] && extra=(--epochs 50 --batch-size 256)
    sparkmim evaluate "$mode" --data "$DATA/train" --val "$DATA/val" "${VOL[@]}" --seed 0 --stage all \
      --weights "$weights" --out "$out" "${extra[@]}" "$@" > "$out.log" 2>&1
    log "evaluate $mode $tag done"
  done
}

finetune() {  # tag weights: the whole network, 1,000 labelled volumes, a short schedule
  local tag=$1 weights=$2 out="$ROOT/eval/$1/finetune"
  [ -f "$out/results.json" ] && return
  mkdir -p "$out"
  sparkmim evaluate finetune --data "$DATA/train" --val "$DATA/val" "${VOL[@]}" --seed 0 --weights "$weights" \
    --epochs 8 --batch-size 16 --warmup-epochs 1 --hflip 0.5 --crop-scale-min 0.8 --out "$out" > "$out.log" 2>&1
  log "evaluate finetune $tag done"
}

first_epoch() {  # the checkpoint after the first epoch of run $1, if it is still kept
  local ckpt; ckpt=$(ls "$ROOT/$1"/checkpoint-*.pth 2>/dev/null | head -1)
  [ "$EPOCHS" -le 4 ] && [ -n "$ckpt" ] && echo ",ep1=$ckpt"
}

screen() {
  pretrain base_s0 --seed 0
  probe base "random$(first_epoch base_s0),ep4=$ROOT/base_s0"
  probe base_bn "random$(first_epoch base_s0),ep4=$ROOT/base_s0" --bn-stats data
  local name
  for spec in "fine_s0 --feature-modules layer1,layer2,layer3" "crop1_s0 --crop-scale-min 1" \
              "rawtgt_s0 --norm-pix false" "single_s0 --hierarchical false"; do
    name=${spec%% *}
    # shellcheck disable=SC2086
    pretrain "$name" --seed 0 ${spec#* }
    probe "$name" "$name=$ROOT/$name"
  done
}

final() {  # a second pre-training seed, the zero-out ablation, and a short fine-tune of each against random
  pretrain zeroout_s0 --seed 0 --sparse false
  probe zeroout_s0 "zeroout_s0=$ROOT/zeroout_s0"
  pretrain base_s1 --seed 1
  probe base_s1 "base_s1=$ROOT/base_s1"
  finetune ft_random random
  finetune ft_spark_s0 "spark_s0=$ROOT/base_s0"
  finetune ft_zeroout_s0 "zeroout_s0=$ROOT/zeroout_s0"
  finetune ft_spark_s1 "spark_s1=$ROOT/base_s1"
  pretrain single_s1 --seed 1 --hierarchical false
  probe single_s1 "single_s1=$ROOT/single_s1"
}

controls() {
  # digits as volumes: the 3-D path on data where SparK helps in 2-D
  local digits=${DIGITS:-data/digits3d}
  [ -d "$digits/pretrain" ] || python experiments/digits3d.py "$digits"
  pretrain digits_s0 --seed 0 --data "$digits/pretrain"
  DATA=$digits probe digits "random$(first_epoch digits_s0),ep4=$ROOT/digits_s0"
  # the middle slices: the same task and recipe in 2-D (timm resnet18 at 64 px: a 2 x 2 grid)
  local slices=${SLICES:-data/shapes2d} s2d=(--model resnet18 --in-chans 1 --input-size 64 --norm-stats data
                                              --workers 1 --device "$DEVICE" --progress false --seed 0)
  [ -d "$slices/pretrain" ] || python experiments/shapes3d.py "$slices" --slices-of "$DATA"
  if [ ! -f "$ROOT/slices_s0/encoder.safetensors" ]; then
    sparkmim pretrain --data "$slices/pretrain" "${s2d[@]}" --batch-size 16 --lr 1e-3 --epochs "$EPOCHS" \
      --warmup-epochs 1 --decoder-width 128 --log-every-steps 25 --keep-last 4 --vis-every-epochs 2 \
      --tensorboard false --out "$ROOT/slices_s0" > "$ROOT/slices_s0.log" 2>&1
  fi
  local w="random$(first_epoch slices_s0),ep4=$ROOT/slices_s0"
  mkdir -p "$ROOT/eval/slices"
  sparkmim evaluate knn --data "$slices/train" --val "$slices/val" "${s2d[@]}" --crop-ratio 1 --stage all \
    --weights "$w" --k 10 --out "$ROOT/eval/slices/knn" > "$ROOT/eval/slices/knn.log" 2>&1
  sparkmim evaluate linear --data "$slices/train" --val "$slices/val" "${s2d[@]}" --crop-ratio 1 --stage all \
    --weights "$w" --epochs 50 --batch-size 256 --out "$ROOT/eval/slices/linear" > "$ROOT/eval/slices/linear.log" 2>&1
  log "controls done"
}

case "${1:-screen}" in
  screen) screen ;;
  final) screen; final ;;
  controls) controls ;;
  *) echo "usage: $0 screen|final|controls" >&2; exit 2 ;;
esac
log "all done"
