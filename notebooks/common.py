"""The notebooks' shared setup: a checkpoint written by osessl.py, its data, networks and memory bank.

Environment (relative paths are read from where you started Jupyter, else from the repository root):
  OSESSL_CHECKPOINT  a last.pt (default runs/cpu-recipe/osessl-s0/last.pt, README's laptop recipe)
  OSESSL_DATA        the ImageFolder root it was trained on (default: the --data-dir it records)
  OSESSL_FAST=1      instead train a tiny network for a few steps on --dataset synthetic (CI does)
"""
import json
import os
import sys
import tempfile
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # osessl.py and knn_eval.py sit one folder up

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import knn_eval  # noqa: E402
import osessl as O  # noqa: E402

RECIPE = ("python osessl.py --dataset imagefolder --data-dir data/cifar10 --width 16 --proj-hidden 512 --proj-dim 128 "
          "--batch-size 128 --epochs 12 --warmup-epochs 1 --ema-start 0.99 --bank-size 4096 --eval-every 2 "
          "--keep-every 3 --memory-format channels_last --out runs/cpu-recipe/osessl-s0")


def resolve(path):
    """A relative path from where the user stands: the shell's $PWD, which Jupyter keeps although it runs
    each notebook inside notebooks/; else from the repository root."""
    if os.path.isabs(path):
        return path
    bases = [os.environ.get("PWD", os.getcwd()), ROOT]
    return next((os.path.join(b, path) for b in bases if os.path.exists(os.path.join(b, path))),
                os.path.join(bases[0], path))


FAST = os.environ.get("OSESSL_FAST") == "1"
if FAST:  # a freshly initialised tiny run, a few steps, so that the memory bank holds something
    tiny = ["--dataset", "synthetic", "--width", "8", "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "32",
            "--bank-size", "128", "--k", "4", "--epochs", "2", "--synthetic-per-class", "16", "--eval-every", "0",
            "--warmup-epochs", "1", "--keep-every", "1"]
    CHECKPOINT = os.path.join(O.train(O.parse_config(tiny + ["--out", tempfile.mkdtemp()])), "last.pt")
else:
    CHECKPOINT = resolve(os.environ.get("OSESSL_CHECKPOINT", "runs/cpu-recipe/osessl-s0/last.pt"))
    if not os.path.isfile(CHECKPOINT):
        raise SystemExit(f"no checkpoint at {CHECKPOINT}: set OSESSL_CHECKPOINT to a last.pt written by osessl.py, "
                         f"or make the laptop recipe's (about an hour on 2 CPU cores) from the repository root: "
                         f"{RECIPE}")
ck = O.read_checkpoint(CHECKPOINT)
cfg = O.Config(**ck["config"])
if cfg.exemplars_per_class != 1:
    raise SystemExit(f"{CHECKPOINT}: the notebooks show one exemplar per class, this run has "
                     f"--exemplars-per-class {cfg.exemplars_per_class}: give a one-shot run's checkpoint")
if not FAST:  # the data the run was trained on, unless told otherwise
    cfg.data_dir = resolve(os.environ.get("OSESSL_DATA", cfg.data_dir))
    cfg.resume = CHECKPOINT
try:  # the checkpoint's classes are checked against the folder before any image is decoded
    train_x, train_y, test_x, test_y, C = O.load_data(cfg, partial(O.load_checkpoint, cfg, ck=ck))
except O.UsageError as e:  # one line, as osessl.py gives it, not a traceback through this file
    raise SystemExit(f"{e} (OSESSL_CHECKPOINT={CHECKPOINT}, OSESSL_DATA={cfg.data_dir})") from None
names = sorted(os.listdir(os.path.join(cfg.data_dir, "train"))) if cfg.dataset == "imagefolder" else \
    [str(c) for c in range(C)]
mean, std = O.channel_stats(train_x)


def network(state):
    net = O.network(cfg)
    net.load_state_dict(state)
    return net.eval()


def embed(net, images):
    """z = norm(g(f(x))) of un-augmented uint8 images, BatchNorm in eval mode."""
    return O.embed(net, images, mean, std)


def memory_bank(checkpoint):
    bank = O.memory_bank(cfg)
    bank.load_state_dict(checkpoint["bank"])
    return bank


def trained_neighbours(checkpoint):
    """The bank and the neighbours (C, k) the run itself chooses at this checkpoint: the un-augmented exemplars
    through the --exemplar-select network score the bank, in the space the run chooses in (--select-space)."""
    b = memory_bank(checkpoint)
    net = network(checkpoint["momentum" if cfg.exemplar_select == "momentum" else "net"])
    h = O.extract_features(net.encoder, train_x[checkpoint["exemplars"]], mean, std)
    select_by = None if b.select is None else F.normalize(h, dim=1)
    return b, O.build_prototypes(O.project(net, h), b.feats, b.valid(), cfg.k, cfg.alpha, cfg.tau_w,
                                 select_by=select_by, select_feats=b.select)[1]


online, momentum, bank = network(ck["net"]), network(ck["momentum"]), memory_bank(ck)
ex_idx = ck["exemplars"]
z_l = embed(online, train_x[ex_idx])          # exemplar embeddings z_l^c (row c = class c)
# the embeddings that score the bank and choose the neighbours (--exemplar-select; members stay z_l)
z_s = embed(momentum, train_x[ex_idx]) if cfg.exemplar_select == "momentum" else z_l
bank_labels = train_y[bank.ids.clamp(min=0)]  # true labels of the bank entries: for display only


def describe_run():
    """Which run the outputs below come from, and its own figures (eval.json, else its last in-training k-NN)."""
    folder = os.path.dirname(CHECKPOINT)

    def read(name):
        path = os.path.join(folder, name)
        return open(path).read() if os.path.exists(path) else ""
    ev = json.loads(read("eval.json") or "{}")
    knn = [r for r in map(json.loads, read("metrics.jsonl").splitlines()) if "knn5" in r and r["step"] <= ck["step"]]
    figures = "no k-NN figure beside it"
    if ev.get("step") == ck["step"]:
        figures = f"5-NN {ev['knn5']:.2f}% on {ev['test_images']} test images (knn_eval.py)"
    elif knn:
        figures = f"5-NN {knn[-1]['knn5']:.2f}% at epoch {knn[-1]['epoch']} (in training)"
    where = os.path.relpath(CHECKPOINT, ROOT) if CHECKPOINT.startswith(ROOT + os.sep) else CHECKPOINT
    where = "of a tiny fresh run (OSESSL_FAST=1)" if FAST else where
    space = ("; it chose neighbours in backbone features h (--select-space encoding), the cells below score in z, the "
             "paper's space" if cfg.select_space == "encoding" else "")
    return (f"checkpoint {where}: step {ck['step']} (epoch {ck.get('epoch', '?')} of {cfg.epochs}), {cfg.dataset}, "
            f"{C} classes, width {cfg.width}, memory bank {int(bank.filled)} / {cfg.bank_size} filled, k = {cfg.k}, "
            f"alpha = {cfg.alpha}; {figures}; chance {100 / C:.0f}%{space}")


@torch.no_grad()
def headroom(checkpoint):
    """How much room one exemplar per class has, in both spaces the method uses: backbone features h and
    embeddings z of the checkpoint's momentum network, un-augmented images, eval-mode BatchNorm. Top-1 (%)
    of the nearest class mean over *all* training labels (a reference: no one-shot classifier reads them),
    of the nearest exemplar and of the nearest prototype (built from the images the bank holds, embedded
    afresh in that space, by build_prototypes), and the neighbour precision of those prototypes."""
    net = network(checkpoint["momentum"])
    h_train, h_test = (O.extract_features(net.encoder, x, mean, std) for x in (train_x, test_x))
    b, ex = memory_bank(checkpoint), checkpoint["exemplars"]
    ids = b.ids[b.valid()]
    row = {}
    for space, (train, test) in {"h": (h_train, h_test),
                                 "z": (O.project(net, h_train), O.project(net, h_test))}.items():
        train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
        filled = torch.ones(len(ids), dtype=torch.bool)
        protos, nbr, _ = O.build_prototypes(train[ex], train[ids], filled, cfg.k, cfg.alpha, cfg.tau_w)
        nearest = lambda centres: 100 * ((test @ centres.T).argmax(1) == test_y).float().mean().item()
        row[f"class mean {space}"] = knn_eval.nearest_class_mean(train, train_y, test, test_y, C)
        row[f"exemplar {space}"] = nearest(train[ex])
        row[f"prototype {space}"] = nearest(protos)
        row[f"precision {space}"] = (train_y[ids[nbr]] == torch.arange(C)[:, None]).float().mean().item()
    return row


def show(images, titles, rows=1, size=1.6, suptitle=None):
    cols = int(np.ceil(len(images) / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(t, fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    plt.tight_layout()
    plt.show()
