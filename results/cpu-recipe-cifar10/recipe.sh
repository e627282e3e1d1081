#!/usr/bin/env bash
# The CPU recipe (issue 22) and its ReSA twin: CIFAR-10 ImageFolder, ResNet-18 at width 16, projector
# 512-512-128, batch 128, 12 epochs (1 warm-up), EMA from 0.99, bank 4,096; in-training k-NN every 2
# epochs, a checkpoint kept every 3 (notebook 1's progress cell). The settings come from compare.sh's
# measured comparisons (results/README.md). Each arm runs single-threaded, all at once (two such runs
# on 2 cores each keep their speed; two 2-thread runs would slow each other about tenfold), then
# knn_eval.py --linear on its last checkpoint. Run from a fresh clone, data extracted into data/cifar10:
#   mkdir -p data && tar -xJf cifar10.tar.xz -C data && results/cpu-recipe-cifar10/recipe.sh [ARM ...]
# Arms: osessl-sN, osessl-encoding-sN (--select-space encoding) and resa-sN (seed N; default: osessl-s0 resa-s0). Runs land in runs/cpu-recipe/ARM;
# their config.json, metrics.jsonl, eval.json and console log are copied beside this script. Running
# it again resumes an arm from its last.pt and skips an arm that has its eval.json.
set -u
cd "$(dirname "$0")/../.."
HERE=results/cpu-recipe-cifar10
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
RECIPE="--dataset imagefolder --data-dir ${DATA_DIR:-data/cifar10} --width 16 --proj-hidden 512 --proj-dim 128
        --batch-size 128 --epochs 12 --warmup-epochs 1 --ema-start 0.99 --bank-size 4096 --eval-every 2 --keep-every 3
        --memory-format channels_last"
flags() {
  case $1 in
    osessl-s[0-9]*) echo "--seed ${1#osessl-s}" ;;
    osessl-encoding-s[0-9]*) echo "--seed ${1#osessl-encoding-s} --select-space encoding" ;;
    resa-s[0-9]*) echo "--seed ${1#resa-s} --lambda-proto 0 --mu-mix 0" ;;
    *) echo "recipe.sh: unknown arm $1 (use osessl-sN, osessl-encoding-sN or resa-sN)" >&2; return 1 ;;
  esac
}
one() {
  local f run=runs/cpu-recipe/$1 resume=()
  f=$(flags "$1") || return 1
  [ -f "$HERE/$1/eval.json" ] && { echo "$1: done (eval.json)"; return 0; }
  [ -f "$run/last.pt" ] && resume=(--resume "$run/last.pt")
  mkdir -p "$HERE/$1"
  # shellcheck disable=SC2086
  $PY osessl.py $RECIPE $f --out "$run" "${resume[@]}" >> "$HERE/$1/console.log" 2>&1 &&
    $PY knn_eval.py --checkpoint "$run/last.pt" --linear >> "$HERE/$1/console.log" 2>&1 &&
    cp "$run/config.json" "$run/metrics.jsonl" "$run/eval.json" "$HERE/$1/" && echo "$1: done"
}
ARMS=("$@")
[ ${#ARMS[@]} -gt 0 ] || ARMS=(osessl-s0 resa-s0)
for a in "${ARMS[@]}"; do flags "$a" > /dev/null || exit 2; done
for a in "${ARMS[@]}"; do one "$a" & done
wait
