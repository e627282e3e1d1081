#!/usr/bin/env bash
# Reproduce README's CIFAR-100 table on one GPU: smoke test, speed table, then the 100-epoch arms,
# each evaluated by knn_eval.py --linear, and the summary table and plot of the finished arms.
#
#   results/cifar100-100ep/run.sh DATA_DIR [ARM ...]   start in the background and return
#   results/cifar100-100ep/run.sh status               each arm's epoch, last k-NN and time left
#   results/cifar100-100ep/run.sh stop                 SIGTERM: the running arms save last.pt and stop
#   results/cifar100-100ep/run.sh --foreground DATA_DIR [ARM ...]   the same work, in this terminal
#
# DATA_DIR is CIFAR-100 as an ImageFolder tree (DIR/train/<class>/*, DIR/test/<class>/*). ARMs, in the
# order given (default: all, in this order): resa, osessl-s0, osessl-s1, osessl-s2 (exemplar seeds 0, 1,
# 2), osessl-online-alone-s0 (the exemplar forward before README's CPU study), osessl-encoding-s0 (the
# neighbours chosen by backbone features, --select-space encoding), resa-official-encoder
# (ReSA with ReSA's official CIFAR encoder, --stem cifar-pad). All: 100 epochs, full ResNet-18,
# batch 256, seed 0, the same flags. A short session gives "resa osessl-s0".
#
# Resumable: run the same command again. Stages already done are skipped (smoke.log ends with "smoke
# passed", speed.txt exists), an arm with an eval.json is skipped, an arm with a last.pt resumes.
# What is worth committing lands in this folder (small files only): smoke.log, speed.txt, run.log,
# per arm config.json, metrics.jsonl, eval.json and console.log, then summary.txt and plot.png.
# Checkpoints stay in RUNS (runs/ is not committed).
#
# Environment: JOBS (arms at once on the one GPU, default 2), STAGES (default "smoke speed arms"),
# ARM_FLAGS (added to every arm, e.g. "--compile"), SPEED_MODES (extra --compile-mode rows of the
# speed table, e.g. "reduce-overhead"), PYTHON (default python3), OUT (default this folder), RUNS
# (default runs/cifar100-100ep), TINY=1 (CI: DATA_DIR "synthetic", width 8, 2 epochs, no compile),
# FINISH_WITHIN (whole minutes from this command's start: an arm is started only if its measured epoch
# time says it ends by then; a run cut off when the GPU goes back is lost, so start only what can finish).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUT=${OUT:-$HERE}
RUNS=${RUNS:-runs/cifar100-100ep}
JOBS=${JOBS:-2}
ALL_ARMS=(resa osessl-s0 osessl-s1 osessl-s2 osessl-online-alone-s0 osessl-encoding-s0 resa-official-encoder)
mkdir -p "$OUT" "$RUNS"
OUT=$(cd "$OUT" && pwd)

arm_flags() {  # the flags that make each arm what it is
  case $1 in
    resa) echo "--lambda-proto 0 --mu-mix 0" ;;
    osessl-s[0-9]) echo "--exemplar-seed ${1#osessl-s}" ;;
    osessl-online-alone-s0) echo "--exemplar-seed 0 --exemplar-select online --exemplar-bn alone" ;;
    osessl-encoding-s0) echo "--exemplar-seed 0 --select-space encoding" ;;
    resa-official-encoder) echo "--lambda-proto 0 --mu-mix 0 --stem cifar-pad" ;;
    *) return 1 ;;
  esac
}

check_args() {  # before detaching, so that a wrong command fails here, in one line
  [ -n "${1:-}" ] || { echo "give DATA_DIR (the CIFAR-100 ImageFolder root)"; exit 2; }
  [ "${TINY:-}" = 1 ] || [ -d "$1/train" ] || {
    echo "$1/train is not a folder: give the CIFAR-100 ImageFolder root"; exit 2; }
  [[ "${FINISH_WITHIN:-0}" =~ ^[0-9]+$ ]] || { echo "FINISH_WITHIN is whole minutes, got $FINISH_WITHIN"; exit 2; }
  shift
  for a in "$@"; do arm_flags "$a" > /dev/null || { echo "unknown arm $a: use ${ALL_ARMS[*]}"; exit 2; }; done
}

case ${1:-} in
  status)
    if [ -f "$OUT/pid" ] && kill -0 "$(cat "$OUT/pid")" 2>/dev/null; then
      echo "run.sh is running (pid $(cat "$OUT/pid")); log: $OUT/run.log"
    else
      echo "run.sh is not running; log: $OUT/run.log"
    fi
    [ -f "$OUT/arms" ] || { echo "no arm listed yet in $OUT"; exit 0; }
    tail -n 3 "$OUT/run.log" 2>/dev/null | sed 's/^/  | /'
    read -r -a arms < "$OUT/arms"
    EPOCHS=$(cat "$OUT/epochs")
    exec "$PY" "$HERE/tools.py" status "$OUT" "$RUNS" "$EPOCHS" "${arms[@]}" ;;
  stop)
    [ -f "$OUT/pid" ] && kill -TERM -- -"$(cat "$OUT/pid")" 2>/dev/null && echo "sent SIGTERM" || echo "not running"
    exit 0 ;;
  --foreground) shift ;;
  ""|-h|--help) sed -n '2,29p' "$0"; exit 2 ;;
  *)  # start detached, in its own process group, and return
    check_args "$@"
    [ -f "$OUT/pid" ] && kill -0 "$(cat "$OUT/pid")" 2>/dev/null && { echo "already running: $0 status"; exit 1; }
    setsid nohup "$0" --foreground "$@" >> "$OUT/run.log" 2>&1 < /dev/null &
    echo $! > "$OUT/pid"
    echo "started (pid $!, log $OUT/run.log): watch with $0 status"
    exit 0 ;;
esac

check_args "$@"
DATA=$1
shift
ARMS=("$@")
[ ${#ARMS[@]} -gt 0 ] || ARMS=("${ALL_ARMS[@]}")
if [ "${TINY:-}" = 1 ]; then  # CI: the whole command in a minute on a CPU
  EPOCHS=2
  DATA_FLAGS=(--dataset synthetic --synthetic-per-class 32)
  NET=(--width 8 --proj-hidden 64 --proj-dim 32)
  BATCH=(--batch-size 32 --bank-size 128 --k 4)
  PHOTO_SIZE=72 MEMORY_BATCH=64 STEPS=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # arms side by side on 2 cores: one thread each
else
  EPOCHS=100
  DATA_FLAGS=(--dataset imagefolder --data-dir "$DATA")
  NET=()
  BATCH=(--batch-size 256)
  PHOTO_SIZE=224 MEMORY_BATCH=1024 STEPS=20
fi
echo "${ARMS[*]}" > "$OUT/arms"
echo "$EPOCHS" > "$OUT/epochs"
STAGES=${STAGES:-smoke speed arms}
[ -z "${FINISH_WITHIN:-}" ] || DEADLINE=$(( $(date +%s) + FINISH_WITHIN * 60 ))
log() { echo "[$(date -u '+%F %T')] $*"; }
log "run.sh ${DATA} ${ARMS[*]} | stages: $STAGES | $($PY -c 'import torch; print("torch", torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")')"

smoke() {  # stops at the first failure, with its log
  local S=$RUNS/smoke
  rm -rf "$S" && mkdir -p "$S"
  check() {
    local what=$1; shift
    log "smoke: $what" | tee -a "$OUT/smoke.log"
    "$@" >> "$OUT/smoke.log" 2>&1 || {
      log "smoke FAILED: $what (see $OUT/smoke.log)"; tail -n 20 "$OUT/smoke.log"; exit 1; }
  }
  : > "$OUT/smoke.log"
  check "2 epochs, k-NN every epoch" "$PY" osessl.py "${DATA_FLAGS[@]}" "${NET[@]}" "${BATCH[@]}" --epochs 2 \
    --eval-every 1 --out "$S/eager"
  if [ "${TINY:-}" != 1 ]; then
    check "1 epoch with --compile" "$PY" osessl.py "${DATA_FLAGS[@]}" "${NET[@]}" "${BATCH[@]}" --epochs 1 --compile \
      --out "$S/compiled"
    check "float32 matrix products on CUDA" "$PY" "$HERE/tools.py" cuda-float32
  fi
  check "knn_eval.py --linear" "$PY" knn_eval.py --checkpoint "$S/eager/last.pt" --linear
  check "generated photo folder" "$PY" "$HERE/tools.py" photos "$S/photos"
  check "1 epoch on ${PHOTO_SIZE} px photos, --data-on host" "$PY" osessl.py --dataset imagefolder \
    --data-dir "$S/photos" --image-size "$PHOTO_SIZE" --data-on host --epochs 1 --batch-size 64 --bank-size 512 \
    "${NET[@]}" --out "$S/photos-run"
  log "smoke passed" | tee -a "$OUT/smoke.log"
}

speed() {
  local modes=() f=$OUT/speed.txt.tmp
  [ "${TINY:-}" = 1 ] || modes=(--compile)
  : > "$f"
  "$PY" results/benchmark.py "${DATA_FLAGS[@]}" "${NET[@]}" "${BATCH[@]}" --steps "$STEPS" "${modes[@]}" >> "$f" 2>&1
  for m in ${SPEED_MODES:-}; do
    "$PY" results/benchmark.py "${DATA_FLAGS[@]}" "${NET[@]}" "${BATCH[@]}" --steps "$STEPS" --compile \
      --compile-mode "$m" >> "$f" 2>&1
  done
  echo "peak memory at batch $MEMORY_BATCH:" >> "$f"
  "$PY" results/benchmark.py "${DATA_FLAGS[@]}" "${NET[@]}" "${BATCH[@]}" --batch-size "$MEMORY_BATCH" \
    --bank-size 4096 --steps 2 >> "$f" 2>&1
  mv "$f" "$OUT/speed.txt"
  log "speed table written to $OUT/speed.txt"
}

run_arm() {  # train (or resume) one arm to the end, evaluate it, copy its small files to OUT
  local a=$1 run=$RUNS/$1 res=$OUT/$1 resume=()
  mkdir -p "$res"
  if [ -f "$res/eval.json" ]; then log "$a: done (eval.json), skipped"; return 0; fi
  [ -f "$run/last.pt" ] && resume=(--resume "$run/last.pt")
  log "$a: ${resume[*]:-starting}"
  # shellcheck disable=SC2046,SC2086
  if ! "$PY" osessl.py "${DATA_FLAGS[@]}" "${NET[@]}" "${BATCH[@]}" --epochs "$EPOCHS" --seed 0 $(arm_flags "$a") \
      ${ARM_FLAGS:-} --out "$run" "${resume[@]}" >> "$res/console.log" 2>&1; then
    log "$a: training stopped (see $res/console.log); run the command again to resume"
    cp "$run"/config.json "$run"/metrics.jsonl "$res"/ 2>/dev/null
    return 1
  fi
  cp "$run"/config.json "$run"/metrics.jsonl "$res"/ 2>/dev/null  # no metrics.jsonl before the first epoch ends
  local reached
  reached=$("$PY" "$HERE/tools.py" epoch "$run")
  if [ "$reached" != "$EPOCHS" ]; then
    log "$a: stopped at epoch $reached of $EPOCHS; run the command again to resume"
    return 1
  fi
  "$PY" knn_eval.py --checkpoint "$run/last.pt" --linear >> "$res/console.log" 2>&1 || {
    log "$a: knn_eval.py failed (see $res/console.log)"; return 1; }
  cp "$run/eval.json" "$res/"
  log "$a: done: $(tr -d '\n ' < "$res/eval.json")"
}

arms() {
  local a failed=0 verdict fits
  mkdir -p "$RUNS/.exit"
  local together=$(( JOBS < ${#ARMS[@]} ? JOBS : ${#ARMS[@]} ))
  for a in "${ARMS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
    if [ -n "${DEADLINE:-}" ] && [ ! -f "$OUT/$a/eval.json" ]; then
      verdict=$("$PY" "$HERE/tools.py" fits "$RUNS" "$a" "$EPOCHS" "$together" $(( DEADLINE - $(date +%s) ))) \
        && fits=1 || fits=0
      log "$verdict"
      if [ $fits = 0 ]; then
        echo 1 > "$RUNS/.exit/$a"
        log "$a: not started (FINISH_WITHIN); run the command again when there is time for it"
        continue
      fi
    fi
    (code=0; run_arm "$a" || code=1; echo $code > "$RUNS/.exit/$a") &
  done
  wait
  for a in "${ARMS[@]}"; do [ "$(cat "$RUNS/.exit/$a")" = 0 ] || failed=1; done
  local finished=()
  for a in "${ARMS[@]}"; do [ -f "$OUT/$a/eval.json" ] && finished+=("$OUT/$a"); done
  if [ ${#finished[@]} -gt 0 ]; then
    "$PY" knn_eval.py --summarize "${finished[@]}" --plot "$OUT/plot.png" > "$OUT/summary.txt" 2>&1 || failed=1
    log "summary of ${#finished[@]} finished arm(s): $OUT/summary.txt, $OUT/plot.png"
  fi
  return $failed
}

for stage in $STAGES; do
  case $stage in
    smoke) grep -q "smoke passed" "$OUT/smoke.log" 2>/dev/null && log "smoke: passed before, skipped" || smoke ;;
    speed) [ -f "$OUT/speed.txt" ] && log "speed: speed.txt exists, skipped" || speed ;;
    arms) arms || { log "some arms did not finish: run the command again to resume them"; exit 1; } ;;
    *) echo "unknown stage $stage: use smoke, speed, arms"; exit 2 ;;
  esac
done
log "all done"
