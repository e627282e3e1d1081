"""knn_eval.py: evaluation of an osessl checkpoint, and the results table of several runs.

Protocols, always reported by name, on the momentum encoder's unnormalised features h (512-d at
width 64) of the un-augmented images (eval-mode BatchNorm), all training images as memory and probe set:
  - ReSA's: 5-NN majority vote, Euclidean distance (osessl.knn_accuracy, also run during training);
  - weighted cosine k-NN (InstDisc/DINO style), k = 20 and 200, T = 0.07;
  - with --linear, ReSA's linear probe (raw features, Adam 1e-2 decayed to 1e-6 over 500 epochs);
  - one-shot classification: each test image to its nearest exemplar embedding, and to its nearest
    grounded prototype, using only the C exemplar labels;
  - references, never results (they read every training label): nearest class mean, in h and in z.
Results are written to eval.json beside the checkpoint.

  python knn_eval.py --checkpoint runs/.../last.pt --dataset imagefolder --data-dir data/cifar100 --linear
  python knn_eval.py --summarize runs/*/ --plot results.png     # results table (+ plot) of several runs
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import osessl
from osessl import UsageError, extract_features, knn_report, project

PROTOCOLS = {
    "knn5": "ReSA 5-NN majority vote, Euclidean, momentum encoder",
    "knn20_cos": "weighted cosine 20-NN (T=0.07), momentum encoder",
    "knn200_cos": "weighted cosine 200-NN (T=0.07), momentum encoder",
    "linear": "linear probe, ReSA's protocol (raw features, 500 epochs), momentum encoder",
    "oneshot_exemplar": "one-shot: nearest exemplar embedding (S per class: their mean; cosine, momentum net)",
    "oneshot_prototype": "one-shot: nearest grounded prototype (cosine, momentum net)",
}
# references, never results: they read every training label (how far a one-shot classifier could go)
REFERENCES = {
    "oracle_ncm_h": "reference, all labels: nearest class mean (cosine), features h",
    "oracle_ncm_z": "reference, all labels: nearest class mean (cosine), embeddings z",
}
# protocols no longer run, still read by --summarize: results/ runs evaluated before 2026-11-25 had a
# linear probe on standardised features (Adam 1e-3, cosine schedule, 100 epochs)
EARLIER = {"linear_standardised": "earlier linear probe (standardised features, 100 epochs)"}


def probe_optimiser(head, epochs=500, lr=1e-2, final_lr=1e-6, weight_decay=5e-6):
    """ReSA's linear protocol: Adam at lr 1e-2, decayed exponentially (once per epoch) to 1e-6 after
    `epochs` epochs, weight decay 5e-6."""
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(final_lr / lr) ** (1 / epochs))


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=500, batch_size=1000, seed=0, log=None):
    """Top-1 (%) on the test features of Linear(e, C) trained on frozen, cached, raw (not standardised)
    features with ReSA's protocol (probe_optimiser; random batches of 1,000), on their device, so that
    the figure stands beside the ReSA and OSESSL papers'. log(epoch) is called every 50 epochs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    head = torch.nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt, sched = probe_optimiser(head, epochs)
    with torch.enable_grad():
        for epoch in range(epochs):
            for idx in torch.randperm(len(train_f), generator=g).to(train_f.device).split(batch_size):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(head(train_f[idx]), train_y[idx]).backward()
                opt.step()
            sched.step()
            if log and (epoch + 1) % 50 == 0:
                log(epoch + 1)
    with torch.no_grad():
        return (head(test_f).argmax(1) == test_y).float().mean().item() * 100


@torch.no_grad()
def one_shot(test_z, test_y, exemplar_z, prototypes=None):
    """Accuracy (%) of assigning each normalised test embedding to its most similar exemplar
    embedding (with S per class: their class_anchor), and to its most similar prototype; row c of both is
    class c (the only labels used).
    No prototypes (a ReSA run keeps no memory bank): the exemplar row only."""
    acc = lambda centres: ((test_z @ centres.T).argmax(1) == test_y).float().mean().item() * 100
    res = {"oneshot_exemplar": acc(exemplar_z)}
    if prototypes is not None:
        res["oneshot_prototype"] = acc(prototypes)
    return res


@torch.no_grad()
def nearest_class_mean(train_f, train_y, test_f, test_y, num_classes):
    """Accuracy (%) of assigning each test feature to the most similar (cosine) mean of a class's
    normalised training features: a one-shot classifier's ceiling-like reference, as it reads the label
    of every training image (here, never in training)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    means = train_f.new_zeros(num_classes, train_f.shape[1]).index_add_(0, train_y, train_f)
    return ((test_f @ F.normalize(means, dim=1).T).argmax(1) == test_y).float().mean().item() * 100


def read_run(d):
    """A run directory's config.json, metrics.jsonl and eval.json (JSON only: nothing read here can run
    code). Its final figures say where they come from: knn_eval.py's eval.json (all training images as
    memory) or the last in-training evaluation (the training images in use). An eval.json older than
    the run's last epoch (a run extended with --resume after it was evaluated) is not used."""
    try:  # a malformed file is one line, not a traceback
        cfg = json.load(open(os.path.join(d, "config.json")))
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if line.strip()]
        final = {k: (v, "in-training") for r in rows for k, v in r.items() if k in PROTOCOLS}  # latest of each
        note = ""
        if os.path.exists(os.path.join(d, "eval.json")):
            ev = json.load(open(os.path.join(d, "eval.json")))
            if ev.get("step") == rows[-1]["step"]:
                final.update({k: (v, "knn_eval") for k, v in ev.items() if k in PROTOCOLS or k in EARLIER})
            else:
                note = (f"{d}: eval.json is of step {ev.get('step')}, the run reached step {rows[-1]['step']} "
                        f"(epoch {rows[-1]['epoch']}): stale, not used; run knn_eval.py on its last.pt again")
        arm = "ReSA" if cfg["lambda_proto"] == 0 and cfg["mu_mix"] == 0 else "OSESSL"
        if arm == "ReSA":  # no memory bank, no prototype: eval.json before 2026-12-01 gave the exemplar row twice
            final.pop("oneshot_prototype", None)
        setting = ""
        if arm == "OSESSL":  # runs from before the two flags ran what they now call online / alone
            setting = f"{cfg.get('exemplar_select', 'online')}/{cfg.get('exemplar_bn', 'alone')}"
            setting += "/h" if cfg.get("select_space", "embedding") == "encoding" else ""
            setting += f"/S{cfg['exemplars_per_class']}" if cfg.get("exemplars_per_class", 1) != 1 else ""
        # another encoder is another experiment, never averaged with the default one: a group of its own
        encoder = [cfg.get("arch", "resnet18"), f"width {cfg['width']}"]
        encoder += [f"{cfg['stem']} stem"] if cfg.get("stem", "auto") not in ("auto", "cifar", "imagenet") else []
        dataset = f"{osessl.dataset_name(cfg['dataset'], cfg['data_dir'])} ({', '.join(encoder)})"
        return dict(dir=d, arm=arm, setting=setting, seed=cfg["exemplar_seed"], final=final, rows=rows, config=cfg,
                    dataset=dataset, epochs=rows[-1]["epoch"],
                    classes=cfg["num_classes"], note=note)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UsageError(f"{d}: not a run directory written by osessl.py ({type(e).__name__}: {e})") from None


def summarize(run_dirs, plot=None):
    """Results table of several runs (their config.json, metrics.jsonl and eval.json): ReSA against
    OSESSL mean +- spread over exemplar seeds, per dataset (and encoder stem, where not the default), epoch
    count and OSESSL setting (--exemplar-select / --exemplar-bn[/h for --select-space encoding], one row each);
    optionally a plot of
    5-NN accuracy, neighbour precision and assignment entropies against epoch."""
    import statistics
    if plot:
        try:
            import matplotlib
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib (or leave out --plot)") from None
    runs = []
    timing = ("seconds", "images_per_s")
    for r in map(read_run, run_dirs):
        untimed = lambda run: [{k: v for k, v in x.items() if k not in timing} for x in run["rows"]]
        same = lambda a, b: a["config"] == b["config"] and untimed(a) == untimed(b)
        twin = next((o for o in runs if same(o, r)), None)
        if twin:
            print(f"note: {r['dir']} holds the same run as {twin['dir']} (config and metrics): counted once")
            continue
        if r["note"]:
            print(f"note: {r['note']}")
        runs.append(r)
    print(f"{'dataset (encoder)':<40} {'epochs':>6} {'protocol':<62} {'select/bn':<15} {'ReSA':>7} "
          f"{'OSESSL (mean +- sd, seeds)':>30} {'gain':>6}  from")
    for key in sorted({(r["dataset"], r["epochs"]) for r in runs}):
        group = [r for r in runs if (r["dataset"], r["epochs"]) == key]
        settings = sorted({r["setting"] for r in group if r["arm"] == "OSESSL"}) or [""]
        for proto, name in {**PROTOCOLS, **EARLIER}.items():
            base = [r["final"][proto] for r in group if r["arm"] == "ReSA" and proto in r["final"]]
            for setting in settings:
                ours = [r["final"][proto] for r in group
                        if r["setting"] == setting and r["arm"] == "OSESSL" and proto in r["final"]]
                if not base and not ours:
                    continue
                mean = lambda pairs: statistics.mean(v for v, _ in pairs)
                b = f"{mean(base):7.2f}" if base else f"{'-':>7}"
                sd = statistics.stdev([v for v, _ in ours]) if len(ours) > 1 else 0.0
                o = f"{mean(ours):.2f} +- {sd:.2f} ({len(ours)})" if ours else "-"
                gain = f"{mean(ours) - mean(base):+6.2f}" if base and ours else f"{'-':>6}"
                sources = {src for _, src in base + ours}
                print(f"{key[0]:<40} {key[1]:>6} {name:<62} {setting:<15} {b} {o:>30} {gain}  "
                      f"{sources.pop() if len(sources) == 1 else 'mixed'}")
    print("from: knn_eval = knn_eval.py's eval.json (memory and probe set: all training images); in-training = "
          "the run's last in-training evaluation (memory: the training images in use, test subset if limited)")
    if plot:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        # accuracy, and the diagnostics that explain it: neighbour precision and assignment entropies
        panels = [("knn5", "ReSA 5-NN top-1 (%), momentum encoder"),
                  ("nbr_precision", "neighbour precision: in training (-), momentum exemplars (:)"),
                  ("usage_entropy", "entropy / log C: batch usage (-), per image (--)")]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        greys = itertools.cycle(["black", "dimgray", "darkgray", "silver"])  # ReSA runs in greys, told apart
        for r in runs:
            label = "ReSA" if r["arm"] == "ReSA" else f"OSESSL {r['setting']}, exemplar seed {r['seed']}"
            label = f"{label} [{os.path.basename(os.path.normpath(r['dir']))}]"  # runs of one setting differ
            color = next(greys) if r["arm"] == "ReSA" else None
            for ax, (key, title) in zip(axes, panels):
                curve = [(row["epoch"], row[key]) for row in r["rows"] if key in row]
                if not curve:
                    continue
                scale = math.log(r["classes"]) if key == "usage_entropy" else 1
                line, = ax.plot(*zip(*[(e, v / scale) for e, v in curve]), color=color, marker="o", markersize=3,
                                label=f"{label} ({r['dataset']})")  # markers: a run evaluated once is a point
                second = {"usage_entropy": ("assign_entropy", "--"),
                          "nbr_precision": ("nbr_precision_momentum", ":")}.get(key)
                points = [(row["epoch"], row[second[0]] / scale) for row in r["rows"] if second and second[0] in row]
                if points:
                    ax.plot(*zip(*points), color=line.get_color(), linestyle=second[1], marker=".")
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("epoch")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot written to {plot}")
    return runs


def momentum_network(path, ck, cfg, device):
    """The checkpoint's momentum network (its encoder is what every protocol evaluates) and memory bank."""
    net, bank = osessl.network(cfg), osessl.memory_bank(cfg)
    osessl.load_parts(path, ck, dict(momentum=net, bank=bank))  # only what this program reads
    return net.to(device), bank.to(device)


def seeded_subset(x, y, n, seed):
    """n images of (x, y), a seeded random subset (0 or n >= len: all)."""
    if not n or n >= len(x):
        return x, y
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[keep], y[keep]


def write_report(path, header, res, names, diagnostics=None, **about):
    """Print res (top-1 %, two decimals) as an aligned table under its protocols' names, in their order,
    then the neighbour-precision diagnostics (three decimals); write all, with `about`, as JSON to path."""
    width = max(map(len, names.values()))
    res = {key: round(res[key], 2) for key in names if key in res}
    diagnostics = {k: round(v, 3) for k, v in (diagnostics or {}).items()}
    print(header)
    print(f"{'protocol':<{width}} top-1 %")
    for key, acc in res.items():
        print(f"{names[key]:<{width}} {acc:7.2f}")
    for key, value in diagnostics.items():  # the exemplars' neighbours among the bank's images, chosen in h or z
        print(f"{'diagnostic: neighbour precision in ' + key[-1]:<{width}} {value:7.3f}")
    with open(path, "w") as f:
        json.dump(dict(res, **diagnostics, **about), f, indent=1)
    return res


def transfer(args, ck, cfg, device):
    """Transfer k-NN (the paper's k-NN(20) on Food-101, CUB-200, Pets-37): the checkpoint's frozen momentum
    encoder on another ImageFolder, its train/ as memory (and linear-probe set), its test/ as queries, its
    own classes, at the checkpoint's image size unless --image-size, normalised by its own training
    images' statistics. No one-shot rows: there is no exemplar of these classes."""
    if not os.path.isdir(args.transfer):
        raise UsageError(f"--transfer {args.transfer} is not a folder: give an ImageFolder root with train/ and test/")
    size = args.image_size or cfg.image_size or 32  # CIFAR and synthetic runs train at 32 px
    other = replace(cfg, dataset="imagefolder", data_dir=args.transfer, image_size=size, train_limit=args.train_limit,
                    test_limit=args.test_limit)
    osessl.check_config(other)  # --image-size and the limits in range
    train_x, train_y, test_x, test_y, num_classes = osessl.load_data(other)
    train_x, train_y = seeded_subset(train_x, train_y, other.train_limit, cfg.seed)
    mean, std = (t.to(device) for t in osessl.channel_stats(train_x))
    net, _ = momentum_network(args.checkpoint, ck, cfg, device)
    train_f, test_f = (extract_features(net.encoder, x, mean, std) for x in (train_x, test_x))
    train_y, test_y = train_y.to(device), test_y.to(device)
    res = knn_report(train_f, train_y, test_f, test_y, num_classes)
    if args.linear:
        res["linear"] = linear_probe(train_f, train_y, test_f, test_y, num_classes)
    name = osessl.dataset_name("imagefolder", args.transfer)
    names = {k: f"transfer to {name}: {v}" for k, v in PROTOCOLS.items()}
    names["knn20_cos"] += " (the paper's k-NN(20))"
    header = (f"{args.checkpoint} (step {ck['step']}) -> {args.transfer}: {num_classes} classes, {len(train_x)} train "
              f"/ {len(test_x)} test images at {train_x.shape[-1]} px")
    path = os.path.join(os.path.dirname(args.checkpoint), f"eval-transfer-{name}.json")
    return write_report(path, header, res, names, step=ck["step"], test_images=len(test_x), train_images=len(train_x))


def balanced_fraction(y, fraction, seed):
    """Indices of a class-balanced, seeded `fraction` of the labels y: round(fraction x n_c) images of each
    class c (at least one), the labeled set of a semi-supervised split."""
    g, picks = torch.Generator().manual_seed(seed), []
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=g)[:max(1, round(fraction * len(members)))]])
    return torch.cat(picks).sort().values


def finetune(encoder, train_x, train_y, test_x, test_y, num_classes, mean, std, epochs, batch_size=256, seed=0,
             log=None):
    """Top-1 (%) on the un-augmented test images after fine-tuning `encoder` (in place) with a new linear
    head on the labeled images given, the semi-supervised protocol of SimCLR's appendix, which BYOL and its
    successors follow (the OSESSL paper names none): every weight trained, BatchNorm in training mode; the
    weak view (random resized crop and flip, osessl.augment); SGD with Nesterov momentum 0.9, learning rate
    0.05 x batch / 256, constant, no weight decay; cross-entropy. log(epoch) after each tenth of the epochs."""
    device = mean.device
    head = torch.nn.Linear(encoder.dim, num_classes).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.05 * batch_size / 256, momentum=0.9, nesterov=True)
    g, step, was_training = torch.Generator().manual_seed(seed), 0, encoder.training
    encoder.train()
    with torch.enable_grad():
        for epoch in range(epochs):
            for idx in torch.randperm(len(train_x), generator=g).split(batch_size):
                if len(idx) < 2:  # BatchNorm needs two images
                    continue
                view = osessl.sample_view_params(len(idx), osessl.step_generator(seed, step, device), train_x.shape[-1])
                x = osessl.augment(train_x[idx].to(device), view, mean, std, strong=False)
                loss = F.cross_entropy(head(encoder(x)), train_y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            if log and (epoch + 1) % max(1, epochs // 10) == 0:
                log(epoch + 1)
    test_f = extract_features(encoder, test_x, mean, std)  # eval-mode BatchNorm, no augmentation
    encoder.train(was_training)
    with torch.no_grad():
        return (head(test_f).argmax(1) == test_y.to(device)).float().mean().item() * 100


def finetune_report(args, ck, cfg, device, train_x, train_y, test_x, test_y, num_classes, mean, std):
    """--finetune: the checkpoint's momentum encoder fine-tuned (in memory; the checkpoint is not touched)."""
    labeled = balanced_fraction(train_y, args.finetune, cfg.seed)
    epochs = args.finetune_epochs or (60 if args.finetune <= 0.01 else 30)
    net, _ = momentum_network(args.checkpoint, ck, cfg, device)
    t0 = time.time()
    acc = finetune(net.encoder, train_x[labeled], train_y[labeled], test_x, test_y, num_classes, mean, std, epochs,
                   args.finetune_batch, cfg.seed, log=lambda e: print(f"  fine-tuning: epoch {e}/{epochs} "
                                                                     f"({time.time() - t0:.0f} s)", flush=True))
    percent = f"{100 * args.finetune:g}"
    names = {"finetune": f"fine-tuned on {percent}% of the labels ({len(labeled)} images), momentum encoder"}
    header = (f"{args.checkpoint}: step {ck['step']}, {cfg.dataset}: {epochs} epochs of batch {args.finetune_batch} "
              f"on {len(labeled)} labeled images, {len(test_x)} test images")
    path = os.path.join(os.path.dirname(args.checkpoint), f"eval-finetune-{percent}pct.json")
    return write_report(path, header, {"finetune": acc}, names, step=ck["step"], labeled_images=len(labeled),
                        epochs=epochs, batch_size=args.finetune_batch, test_images=len(test_x))


def main(argv=None):
    p = osessl._Parser(description="evaluation of osessl checkpoints, and results tables of runs")
    p.add_argument("--checkpoint", help="last.pt written by osessl.py")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--train-limit", type=int, default=0,
                   help="k-NN memory and probe training set: this many training images (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on this many test images (0 = all)")
    p.add_argument("--linear", action="store_true", help="also train a linear probe on the frozen features")
    p.add_argument("--transfer", default="", metavar="DIR", help="evaluate on another ImageFolder (DIR/train as "
                   "memory, DIR/test as queries, its own classes) into eval-transfer-<name>.json")
    p.add_argument("--image-size", type=int, default=0, help="with --transfer: its image size (default: the "
                   "checkpoint's)")
    p.add_argument("--finetune", type=float, default=0, metavar="FRACTION", help="fine-tune the encoder with a "
                   "linear head on this class-balanced fraction of the training labels (the paper: 0.01, 0.1) into "
                   "eval-finetune-<percent>pct.json")
    p.add_argument("--finetune-epochs", type=int, default=0, help="default: SimCLR's, 60 up to 1%% of the labels, "
                   "else 30")
    p.add_argument("--finetune-batch", type=int, default=256, help="fine-tuning batch (learning rate 0.05 x "
                   "batch / 256)")
    p.add_argument("--device", default="", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--summarize", nargs="+", metavar="RUN_DIR", help="print the results table of these run directories")
    p.add_argument("--plot", default="", help="with --summarize: write a PNG of 5-NN accuracy, neighbour precision "
                   "and assignment entropies against epoch")
    args = p.parse_args(argv)
    try:
        if args.summarize:
            missing = [d for d in args.summarize if not os.path.exists(os.path.join(d, "metrics.jsonl"))]
            if missing:
                raise UsageError(f"{missing[0]} holds no metrics.jsonl: pass run directories written by "
                                        "osessl.py")
            return summarize(args.summarize, args.plot)
        if not args.checkpoint:
            raise UsageError("give --checkpoint runs/.../last.pt (or --summarize RUN_DIR ...)")
        if not 0 <= args.finetune <= 1 or args.finetune_epochs < 0 or args.finetune_batch < 2:
            raise UsageError(f"--finetune is a fraction in (0, 1], --finetune-epochs at least 0 and --finetune-batch "
                             f"at least 2; got {args.finetune}, {args.finetune_epochs}, {args.finetune_batch}")
        if args.transfer and args.finetune:
            raise UsageError("give --transfer or --finetune, not both (each writes its own eval-*.json)")
        if args.finetune and (args.linear or args.train_limit):
            raise UsageError("--finetune draws its labeled fraction from every training image and probes nothing: "
                             "leave out --linear and --train-limit")
        if not args.finetune and (args.finetune_epochs or args.finetune_batch != 256):
            raise UsageError("--finetune-epochs and --finetune-batch set --finetune FRACTION: give it too")
        ck = osessl.read_checkpoint(args.checkpoint)
        cfg = osessl.Config(**ck["config"])
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.image_size and not args.transfer:
            raise UsageError("--image-size is for --transfer; the checkpoint's own data keep its image size")
        if args.transfer and (args.dataset or args.data_dir):
            raise UsageError("--transfer DIR names the other data itself: leave out --dataset and --data-dir")
        if args.transfer:
            return transfer(args, ck, cfg, device)
        cfg.resume = args.checkpoint
        cfg.dataset = args.dataset or cfg.dataset
        cfg.data_dir = args.data_dir or cfg.data_dir
        cfg.train_limit, cfg.test_limit = args.train_limit, args.test_limit
        osessl.check_config(cfg)
        check = functools.partial(osessl.load_checkpoint, cfg, ck=ck)  # before any image is decoded
        train_x, train_y, test_x, test_y, num_classes = osessl.load_data(cfg, check)
        mean, std = (t.to(device) for t in osessl.channel_stats(train_x))
        if args.finetune:
            return finetune_report(args, ck, cfg, device, train_x, train_y, test_x, test_y, num_classes, mean, std)
        exemplars = ck["exemplars"]
        if not len(exemplars):  # a ReSA run has none: one-shot evaluation draws them as an OSESSL run would
            exemplars = osessl.select_exemplars(cfg, train_y, num_classes)
        exemplar_x, full_x, full_y = train_x[exemplars], train_x, train_y  # the bank's ids index the full split
        train_x, train_y = seeded_subset(train_x, train_y, cfg.train_limit, cfg.seed)
        net, bank = momentum_network(args.checkpoint, ck, cfg, device)
        feats = lambda m, x: extract_features(m, x, mean, std)  # host images, device chunks
        t0 = time.time()
        say = lambda what: print(f"  {what} ({time.time() - t0:.0f} s)", flush=True)
        print(f"{args.checkpoint}: features of {len(train_x)} training and {len(test_x)} test images on {device}",
              flush=True)
        train_f, test_f = feats(net.encoder, train_x), feats(net.encoder, test_x)
        train_y, test_y = train_y.to(device), test_y.to(device)
        say("features done")
        res = knn_report(train_f, train_y, test_f, test_y, num_classes)
        say("k-NN done")
        if args.linear:
            res["linear"] = linear_probe(train_f, train_y, test_f, test_y, num_classes,
                                         log=lambda epoch: say(f"linear probe: epoch {epoch}/500"))
        ex_h = feats(net.encoder, exemplar_x)
        train_z, test_z, ex_z = (project(net, h) for h in (train_f, test_f, ex_h))
        per_class = lambda z: z.unflatten(0, (num_classes, -1))  # (C, S, .): S labeled images per class
        res["oracle_ncm_h"] = nearest_class_mean(train_f, train_y, test_f, test_y, num_classes)
        res["oracle_ncm_z"] = nearest_class_mean(train_z, train_y, test_z, test_y, num_classes)
        valid, protos = bank.valid(), None  # without a filled bank a "prototype" is the exemplar alone: not reported
        if valid.any():  # in z, or in h as the run chose (--select-space encoding); by the momentum network's
            # exemplars, whatever --exemplar-select (this program loads only the momentum network)
            in_h = {} if bank.select is None else dict(select_by=per_class(F.normalize(ex_h, dim=1)),
                                                         select_feats=bank.select)
            protos = osessl.build_prototypes(per_class(ex_z), bank.feats, valid, cfg.k, cfg.alpha, cfg.tau_w,
                                             **in_h)[0]
        res.update(one_shot(test_z, test_y, osessl.class_anchor(per_class(ex_z)), protos))
        diagnostics = osessl.precision_by_space(net, full_x, full_y.to(device), bank, exemplar_x, num_classes, mean,
                                                std, cfg.k, cfg.alpha)  # labels training never reads
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    header = (f"{args.checkpoint}: step {ck['step']} (epoch {ck.get('epoch')}), {cfg.dataset}, "
              f"{len(train_x)} train / {len(test_x)} test images")
    return write_report(os.path.join(os.path.dirname(args.checkpoint), "eval.json"), header, res,
                        {**PROTOCOLS, **REFERENCES}, diagnostics, step=ck["step"], test_images=len(test_x),
                        train_images=len(train_x))


if __name__ == "__main__":
    main()
