#!/bin/bash
# CPU study of issue 12 on a frozen checkout of commit 9c0a66e: 4 exemplar-forward
# settings x exemplar seeds 0, 1; two single-threaded runs at a time.
# Ran on 2026-11-24 on the 2-core CPU machine, in two sessions: the first two jobs of each worker (online/alone,
# momentum/alone) in the first; the joint settings (the last two jobs of each worker) in the second, on the same
# frozen commit 9c0a66e, in the order online-joint-s0 with momentum-joint-s1, then momentum-joint-s0 with
# online-joint-s1 (the second session's runs shared the cores with test-suite runs at times: wall-clock says
# nothing about the settings' cost). A machine restart cut off the last pair: momentum-joint-s0 after its training
# (its knn_eval.py was run afterwards), online-joint-s1 after epoch 19, finished by
#   osessl.py $C --exemplar-select online --exemplar-bn joint --exemplar-seed 1 --resume $R/online-joint-s1/last.pt
# (resuming continues a run exactly, test_resume_is_exact), then its knn_eval.py as below.
# From a fresh clone, wherever it lies: run it in a checkout of that commit with the data extracted there,
#   git worktree add ../study_code 9c0a66e && mkdir -p ../study_code/data && tar -xJf cifar10.tar.xz -C ../study_code/data
#   STUDY_CODE=../study_code results/cpu-exemplar-forward/study.sh
# (without STUDY_CODE it runs the code of this checkout, from the repository root). Runs land in runs/xf there.
cd "${STUDY_CODE:-$(dirname "$0")/../..}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
R=runs/xf
mkdir -p $R
C="--dataset imagefolder --data-dir data/cifar10 --width 16 --train-limit 2560 --test-limit 1000 --epochs 20 --eval-every 5 --batch-size 128 --bank-size 1024"
one() {  # select bn seed
  d=$R/$1-$2-s$3
  $PY osessl.py $C --exemplar-select $1 --exemplar-bn $2 --exemplar-seed $3 --out $d > $d.log 2>&1
  $PY knn_eval.py --checkpoint $d/last.pt --data-dir data/cifar10 --linear >> $d.log 2>&1
}
worker() { for job in "$@"; do set -- $job; one "$1" "$2" "$3"; done; }
worker "online alone 0" "momentum alone 0" "online joint 0" "momentum joint 0" &
worker "online alone 1" "momentum alone 1" "online joint 1" "momentum joint 1" &
wait
echo ALL DONE > $R/done
