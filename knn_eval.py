"""knn_eval.py: k-NN evaluation of an osessl encoder (METHOD.md section 8), batched on the device.

Protocols, always reported by name:
  - ReSA's: 5-NN majority vote, Euclidean distance on the momentum encoder's unnormalised features;
  - weighted cosine k-NN (InstDisc/DINO style), k = 20 and 200, T = 0.07, same features.

Used by osessl.py every --eval-every epochs, and on its own on a checkpoint:
  python knn_eval.py --checkpoint runs/.../last.pt --dataset imagefolder --data-dir data/cifar100
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

PROTOCOLS = {
    "knn5": "ReSA 5-NN majority vote, Euclidean, momentum encoder",
    "knn20_cos": "weighted cosine 20-NN (T=0.07), momentum encoder",
    "knn200_cos": "weighted cosine 200-NN (T=0.07), momentum encoder",
}


@torch.no_grad()
def extract_features(encoder, images, mean, std, to_net=lambda x: x, batch_size=1024):
    """Unnormalised encoder features (N, e) in float32 of uint8 images (N, 3, H, W), in eval mode
    (BatchNorm running statistics), no augmentation."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for chunk in images.split(batch_size):
        x = (chunk.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            out.append(encoder(to_net(x)).float())
    encoder.train(was_training)
    return torch.cat(out)


def _neighbours(train_f, test_f, k, cosine, chunk=1024):
    """Indices (N_test, k) of the k nearest training features, and their cosine similarities."""
    idx, sims = [], []
    for q in test_f.split(chunk):
        if cosine:
            s = q @ train_f.T
        else:  # -||q - t||^2 up to a per-query constant: the ranking of Euclidean distance
            s = 2 * q @ train_f.T - (train_f * train_f).sum(1)[None]
        v, i = s.topk(k, dim=1)
        idx.append(i)
        sims.append(v)
    return torch.cat(idx), torch.cat(sims)


@torch.no_grad()
def knn_majority(train_f, train_y, test_f, test_y, num_classes, k=5):
    """ReSA's protocol: majority vote of the k Euclidean nearest neighbours (ties: lowest class).
    Returns top-1 accuracy in percent."""
    idx, _ = _neighbours(train_f.float(), test_f.float(), k, cosine=False)
    votes = F.one_hot(train_y[idx], num_classes).sum(1)
    return (votes.argmax(1) == test_y).float().mean().item() * 100


@torch.no_grad()
def knn_weighted_cosine(train_f, train_y, test_f, test_y, num_classes, k=20, T=0.07):
    """Weighted cosine k-NN: each neighbour votes exp(cos / T) for its class. Accuracy in percent."""
    train_n, test_n = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    idx, sims = _neighbours(train_n, test_n, k, cosine=True)
    votes = (F.one_hot(train_y[idx], num_classes) * (sims / T).exp()[..., None]).sum(1)
    return (votes.argmax(1) == test_y).float().mean().item() * 100


def knn_report(train_f, train_y, test_f, test_y, num_classes):
    """All k-NN protocols, keyed as in PROTOCOLS (k capped at the memory size)."""
    n = len(train_f)
    return {"knn5": knn_majority(train_f, train_y, test_f, test_y, num_classes, min(5, n)),
            "knn20_cos": knn_weighted_cosine(train_f, train_y, test_f, test_y, num_classes, min(20, n)),
            "knn200_cos": knn_weighted_cosine(train_f, train_y, test_f, test_y, num_classes, min(200, n))}


def main(argv=None):
    import osessl  # imported here: osessl imports this module at the top
    p = osessl._Parser(description="k-NN evaluation of an osessl checkpoint")
    p.add_argument("--checkpoint", required=True, help="last.pt written by osessl.py")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--train-limit", type=int, default=0, help="k-NN memory: this many training images (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on this many test images (0 = all)")
    p.add_argument("--device", default="", help="cuda | cpu (default: cuda when available)")
    args = p.parse_args(argv)
    try:
        ck = osessl.read_checkpoint(args.checkpoint)
        cfg = osessl.Config(**ck["config"])
        cfg.resume = args.checkpoint
        cfg.dataset = args.dataset or cfg.dataset
        cfg.data_dir = args.data_dir or cfg.data_dir
        cfg.train_limit, cfg.test_limit = args.train_limit, args.test_limit
        train_x, train_y, test_x, test_y, num_classes = osessl.load_data(cfg)
        ck = osessl.load_checkpoint(cfg, num_classes)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        mean, std = osessl.channel_stats(train_x)
        if cfg.train_limit and cfg.train_limit < len(train_x):
            keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_limit]
            train_x, train_y = train_x[keep], train_y[keep]
        net = osessl.Network(cfg.width, cfg.proj_hidden, cfg.proj_dim)
        net.load_state_dict(ck["momentum"])
        enc = net.encoder.to(device)
        feats = lambda x: extract_features(enc, x.to(device), mean.to(device), std.to(device))
        res = knn_report(feats(train_x), train_y.to(device), feats(test_x), test_y.to(device), num_classes)
    except osessl.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.checkpoint}: step {ck['step']} (epoch {ck['epoch']}), {cfg.dataset}, "
          f"{len(train_x)} train / {len(test_x)} test images")
    print(f"{'protocol':<56} top-1 %")
    for key, acc in res.items():
        print(f"{PROTOCOLS[key]:<56} {acc:6.2f}")
    return res


if __name__ == "__main__":
    main()
