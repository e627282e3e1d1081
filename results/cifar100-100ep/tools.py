"""Helpers of run.sh (beside it): the status table, the last epoch of a run, a generated photo folder,
and the check that float32 matrix products on CUDA are true float32. Each is one subcommand:

  python tools.py status OUT RUNS EPOCHS ARM ...   each arm's state, epoch, last k-NN, time left
  python tools.py epoch RUN_DIR                    the last epoch in RUN_DIR/metrics.jsonl (0 if none)
  python tools.py fits RUNS ARM EPOCHS JOBS SECONDS can ARM still finish in SECONDS? (exit 0 yes, 1 no)
  python tools.py photos DIR                       10 classes of JPEGs of several sizes (the ImageNet path)
  python tools.py cuda-float32                     Sinkhorn on CUDA against float64 (fails under TF32)
"""
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def seconds_per_epoch(r):
    """An arm's recent pace: the median training seconds of its last 5 epochs (None before its first)."""
    return statistics.median(row["seconds"] for row in r[-5:]) if r else None


def status(out, runs, epochs, arms):
    """One line per arm: done (eval.json), running or stopped (a checkpoint), queued (nothing yet)."""
    epochs = int(epochs)
    print(f"{'arm':<26} {'state':<9} {'epoch':>9} {'k-NN 5 (in training)':>21} {'s/epoch':>8} {'time left':>10}")
    left_total = 0.0
    for arm in arms:
        run, res = os.path.join(runs, arm), os.path.join(out, arm)
        r = rows(run) or rows(res)
        done = os.path.exists(os.path.join(res, "eval.json"))
        epoch = r[-1]["epoch"] if r else 0
        knn = next((row["knn5"] for row in reversed(r) if "knn5" in row), None)
        per_epoch = seconds_per_epoch(r)
        state = "done" if done else "started" if r else "queued"
        left = 0 if done else (epochs - epoch) * per_epoch if per_epoch else None
        left_total += left or 0
        print(f"{arm:<26} {state:<9} {f'{epoch}/{epochs}':>9} {'-' if knn is None else f'{knn:.2f}':>21} "
              f"{'-' if per_epoch is None else f'{per_epoch:.1f}':>8} "
              f"{'-' if left is None else f'{left / 60:.1f} min':>10}")
    print(f"time left of the started arms, one after another: {left_total / 60:.1f} min (arms run side by side: less)")


def epoch(run_dir):
    r = rows(run_dir)
    print(r[-1]["epoch"] if r else 0)


def fits(runs, arm, epochs, jobs, seconds):
    """Whether an arm can finish its remaining epochs in `seconds`, from a measured epoch time: its own
    recent epochs if it has run (measured beside the arms it ran with), else the smoke test's second
    eager epoch (the arms' setting, warmed up, alone: taken `jobs` times longer, as if `jobs` arms side
    by side shared the GPU evenly). Allowances (guessed, not measured): +10% for the in-training k-NN,
    90 s for knn_eval.py --linear. No epoch time measured yet: it may start."""
    epochs, jobs, seconds = int(epochs), int(jobs), float(seconds)
    own, smoke = rows(os.path.join(runs, arm)), rows(os.path.join(runs, "smoke", "eager"))
    if own:
        per_epoch, source = seconds_per_epoch(own), "its own epochs"
    elif smoke:
        per_epoch, source = smoke[-1]["seconds"] * jobs, f"the smoke test's, x{jobs} arms at once"
    else:
        print(f"{arm}: no epoch time measured yet, started without an estimate")
        return True
    left = epochs - (own[-1]["epoch"] if own else 0)
    need = left * per_epoch * 1.1 + 90
    ok = need <= seconds
    print(f"{arm}: needs about {need / 60:.1f} min ({left} epochs at {per_epoch:.1f} s, {source}), "
          f"{seconds / 60:.1f} min left: {'fits' if ok else 'does not fit'}")
    return ok


def photos(root, per_class=20, test_per_class=5):
    """JPEGs of several sizes and shapes, one colour layout per class: the 224 px ImageFolder path."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(10):
        colour = rng.integers(0, 256, 3)
        for split, n in (("train", per_class), ("test", test_per_class)):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(n):
                w, h = rng.integers(200, 400, 2)
                img = np.clip(colour + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, f"class{c}", f"{i}.jpg"), quality=90)


def cuda_float32():
    """After osessl's cuda_settings, Sinkhorn of float32 scores on CUDA matches float64 to 2e-5 (relative
    to its largest entry; float32 on the CPU: 6e-7). TF32 products (inputs rounded to a 10-bit mantissa,
    simulated on the CPU) miss by 4e-4 at eps = 0.05."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import osessl
    osessl.cuda_settings()
    g = torch.Generator().manual_seed(0)
    h, hm = (torch.nn.functional.normalize(torch.randn(256, 512, generator=g, dtype=torch.float64), dim=1)
             for _ in range(2))
    ref = osessl.sinkhorn(h @ hm.T)
    got = osessl.sinkhorn(h.float().cuda() @ hm.float().cuda().T).double().cpu()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"Sinkhorn on CUDA (float32) against float64: max relative error {err:.2e}")
    if err > 2e-5:
        sys.exit(f"float32 matrix products on CUDA are not true float32 (TF32?): error {err:.2e} > 2e-5")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "status":
        status(args[0], args[1], args[2], args[3:])
    elif command == "epoch":
        epoch(args[0])
    elif command == "fits":
        sys.exit(0 if fits(*args) else 1)
    elif command == "photos":
        photos(args[0])
    elif command == "cuda-float32":
        cuda_float32()
    else:
        sys.exit(f"unknown command {command}: use status, epoch, fits, photos or cuda-float32")
