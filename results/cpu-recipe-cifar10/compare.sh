#!/usr/bin/env bash
# Short comparisons that choose the CPU recipe's settings (issue 22), one setting changed at a time
# from the first trial's (width 16, projector 512-512-128, batch 128, lr 0.3 per 256, 1 warm-up epoch,
# EMA from 0.99, bank 4096): CIFAR-10 ImageFolder, 10,000 training images, 3 epochs, in-training k-NN
# every epoch (memory: the 10,000 images in use; 2,000 test images). Two single-threaded runs at a
# time on the 2-core CPU machine. Run from a fresh clone, data extracted into data/cifar10:
#   mkdir -p data && tar -xJf cifar10.tar.xz -C data && results/cpu-recipe-cifar10/compare.sh [NAME ...]
# Each run lands in runs/recipe-compare/NAME; its config.json and metrics.jsonl are copied beside this script.
set -u
cd "$(dirname "$0")/../.."
HERE=results/cpu-recipe-cifar10/compare
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
BASE="--dataset imagefolder --data-dir data/cifar10 --width 16 --proj-hidden 512 --proj-dim 128 --batch-size 128
      --warmup-epochs 1 --ema-start 0.99 --bank-size 4096 --train-limit 10000 --test-limit 2000 --epochs 3
      --eval-every 1 --seed 0"
flags() {
  case $1 in
    base) echo "" ;;
    lr0.6) echo "--lr 0.6" ;;
    lr1.2) echo "--lr 1.2" ;;
    ema0.996) echo "--ema-start 0.996" ;;
    ema0.98) echo "--ema-start 0.98" ;;
    warmup0) echo "--warmup-epochs 0" ;;
    bank1024) echo "--bank-size 1024" ;;
    batch256) echo "--batch-size 256" ;;
    base-s1) echo "--seed 1" ;;                                     # the noise of one comparison
    combo) echo "--lr 0.6 --ema-start 0.98" ;;                       # the two that helped, together
    combo-resa) echo "--lr 0.6 --ema-start 0.98 --lambda-proto 0 --mu-mix 0" ;;
    combo-k4) echo "--lr 0.6 --ema-start 0.98 --k 4" ;;
    *) echo "unknown comparison $1" >&2; return 1 ;;
  esac
}
one() {
  local f; f=$(flags "$1") || return 1
  mkdir -p "$HERE/$1"
  # shellcheck disable=SC2086
  $PY osessl.py $BASE $f --out "runs/recipe-compare/$1" --overwrite > "$HERE/$1/console.log" 2>&1
  cp "runs/recipe-compare/$1/config.json" "runs/recipe-compare/$1/metrics.jsonl" "$HERE/$1/"
}
NAMES=("$@")
# first batch (2026-11-25): base lr0.6 ema0.996 ema0.98 warmup0 bank1024 lr1.2 batch256; second: base-s1 combo
# combo-resa combo-k4
[ ${#NAMES[@]} -gt 0 ] || NAMES=(base lr0.6 ema0.996 ema0.98 warmup0 bank1024 lr1.2 batch256 base-s1 combo combo-resa
                                 combo-k4)
for ((i = 0; i < ${#NAMES[@]}; i += 2)); do
  one "${NAMES[i]}" &
  [ $((i + 1)) -lt ${#NAMES[@]} ] && one "${NAMES[i + 1]}" &
  wait
done
