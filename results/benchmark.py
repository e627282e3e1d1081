"""results/benchmark.py: where the time of an osessl training step goes. One table, every row
measured in the same run: ms per step, images/s, seconds per 50,000-image epoch, peak GPU memory.

It takes osessl.py's training flags, runs warm-up steps, then times 5 blocks of --steps steps with
the device synchronised around each block and prints the median per row: the full OSESSL step fed
by the device-side pipeline, the same step on pre-made tensors (compute only), the augmentation
alone, the ReSA-only step, the OSESSL step fed by a torchvision PIL-transform DataLoader on every
CPU core, the step in the other memory layout (--memory-format), with --compile also the eager step
beside the compiled one, and one k-NN evaluation.

  python results/benchmark.py --dataset imagefolder --data-dir data/cifar100 --batch-size 256 --compile
"""
import os
import sys
import time
from dataclasses import replace
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # osessl.py, one folder up
import osessl as O  # noqa: E402


def time_per_call(fn, device, steps, repeats=5, warmup=5):
    """Median seconds per call over `repeats` timed blocks of `steps` calls, after warm-up
    (which also absorbs compilation), with the device synchronised around each block."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        times.append((time.perf_counter() - t) / steps)
    return sorted(times)[len(times) // 2]


def pil_dataloader(images, mean, std, batch_size, workers, pin):
    """The usual pipeline, for comparison: torchvision PIL transforms in a DataLoader."""
    from torchvision import transforms as T
    crop = partial(T.RandomResizedCrop, images.shape[-1], scale=(0.2, 1.0))
    weak = T.Compose([crop(), T.RandomHorizontalFlip()])
    strong = T.Compose([crop(interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(),
                        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                        T.RandomGrayscale(0.2), T.RandomSolarize(128, p=0.2)])
    finish = T.Compose([T.ToTensor(), T.Normalize(mean.tolist(), std.tolist())])

    class TwoViews(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            img = T.functional.to_pil_image(images[i])
            return finish(weak(img)), finish(strong(img))
    loader = torch.utils.data.DataLoader(TwoViews(), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    while True:
        yield from loader


def benchmark(cfg, device, steps=20):
    """One table, every row measured in this run: ms/step, images/s, s per 50,000-image epoch, peak memory."""
    train_x, train_y, test_x, test_y, C = O.load_data(cfg)
    cfg = O.settle(cfg, train_x.shape[-1])
    ex_idx = O.select_exemplars(cfg, train_y, C)
    cpu_x, train_x = train_x, train_x.to(device)
    B = cfg.batch_size
    if B > len(train_x) or B > cfg.bank_size:
        raise O.UsageError(f"--batch-size {B} must not exceed the {len(train_x)} training images nor --bank-size")
    variants = dict(osessl={}, resa=dict(lambda_proto=0.0, mu_mix=0.0))
    if cfg.compile:  # what compilation buys, measured in the same run (a row below)
        variants["eager"] = dict(compile=False)
    runs = {m: O.build_run(replace(cfg, **w), 0, 1, device, train_x, train_y, ex_idx, C) for m, w in variants.items()}
    layout = "contiguous" if O.memory_format(cfg, device) == torch.channels_last else "channels_last"  # the other one
    runs["layout"] = O.build_run(replace(cfg, memory_format=layout), 0, 1, device, train_x, train_y, ex_idx, C)
    osessl_run = runs["osessl"]
    counter = iter(range(10 ** 9))

    perm = O.epoch_permutation(cfg.seed, 0, len(train_x)).to(device)
    per_epoch = len(train_x) // B

    def batch():  # as in training: a slice of a device-side permutation, no host-device copy
        step = next(counter)
        i = step % per_epoch
        rnd = O.step_randomness(cfg.seed, step, B, C, cfg.zeta, device, train_x.shape[-1], cfg.blur == "on")
        return perm[i * B:(i + 1) * B], rnd
    ids0, rnd0 = batch()
    premade = [x.clone() for x in osessl_run.augment(osessl_run, train_x[ids0], rnd0)]  # CUDA graphs reuse outputs
    workers = os.cpu_count() or 1
    loader = pil_dataloader(cpu_x, osessl_run.mean.cpu(), osessl_run.std.cpu(), B, workers, device.type == "cuda")

    def pipeline_step(run):
        ids, rnd = batch()
        O.training_step(run, *run.augment(run, train_x[ids], rnd), ids, rnd, 0.01, 0.996)

    def pil_step():
        x1, x2 = (osessl_run.to_net(x.to(device, non_blocking=True)) for x in next(loader))
        O.training_step(osessl_run, x1, x2, ids0, rnd0, 0.01, 0.996)
    memory, test = (train_x, train_y.to(device)), (test_x.to(device), test_y.to(device))
    rows = [("OSESSL step, device pipeline (data + augmentation + step)", lambda: pipeline_step(osessl_run)),
            ("OSESSL step on pre-made tensors (compute only)",
             lambda: O.training_step(osessl_run, *premade, ids0, rnd0, 0.01, 0.996)),
            ("device augmentation alone (weak + strong views)",
             lambda: osessl_run.augment(osessl_run, train_x[batch()[0]], rnd0)),
            ("ReSA-only step, device pipeline (lambda = mu = 0)", lambda: pipeline_step(runs["resa"])),
            (f"OSESSL step fed by a PIL DataLoader ({workers} workers)", pil_step),
            (f"OSESSL step, device pipeline, {layout} layout", lambda: pipeline_step(runs["layout"]))]
    if cfg.compile:
        rows.append(("OSESSL step, device pipeline, eager (no --compile)", lambda: pipeline_step(runs["eager"])))
    print(f"benchmark: {cfg.dataset}, batch {B}, width {cfg.width}, {C} classes, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"compile {cfg.compile_mode if cfg.compile else 'off'}, "
          f"median of 5 x {steps} steps after 5 warm-up steps")
    print(f"{'what':<60} {'ms/step':>9} {'images/s':>10} {'s/epoch':>8} {'peak MiB':>9}")
    # the last row times one k-NN evaluation (features of every training and test image, 3 protocols)
    timed = [(name, fn, steps, 5, B, True) for name, fn in rows] + [
        (f"k-NN evaluation of {len(train_x)} + {len(test_x)} images (ms per evaluation)",
         lambda: O.evaluate(osessl_run, *memory, *test), 1, 1, len(train_x) + len(test_x), False)]
    for name, fn, steps, warmup, images, is_step in timed:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = time_per_call(fn, device, steps, warmup=warmup)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:9.0f}" if device.type == "cuda" else f"{'n/a':>9}"
        epoch = f"{50_000 / (images / sec):8.2f}" if is_step else f"{'-':>8}"
        print(f"{name:<60} {sec * 1e3:9.1f} {images / sec:10.0f} {epoch} {peak}", flush=True)


def main(argv=None):
    p = O.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--steps", type=int, default=20, help="timed steps per block (median of 5 blocks, after 5 "
                   "warm-up steps)")
    args = vars(p.parse_args(argv))
    steps = args.pop("steps")
    try:
        cfg = O.Config(**args)
        O.check_config(cfg)
        if steps < 1:
            raise O.UsageError(f"--steps must be positive, got {steps}")
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        if cuda:
            O.cuda_settings()
        benchmark(cfg, torch.device("cuda" if cuda else "cpu"), steps)
    except O.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
