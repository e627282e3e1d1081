"""osessl.py: One-Shot Exemplar Self-Supervised Learning (OSESSL, ICLR 2026) in one file.

One labeled image per class (an exemplar) grounds a clustering-based self-supervised learner,
ReSA, in the real class space: each exemplar gathers its most discriminative neighbours from a
memory bank into a class prototype; unlabeled views learn to predict each other's assignment to
those prototypes (alignment), the prototypes are pushed apart (dispersion), and mixup images must
predict interpolated assignments (interpolation consistency):
    L = L_resa + lambda (L_align + L_disp) + mu (L_mix_proto + L_mix_ins).
Training reads no label except the C exemplars'.

The method comes first (sections 1-5): functions of tensors, osessl_loss the whole objective, then
the step that wires it; networks, data, augmentation, config, the training loop and the entry point follow.

Run (the same file with or without a launcher):
  python osessl.py --dataset synthetic --epochs 2 --warmup-epochs 1 --ema-start 0.99 --width 16 \
      --batch-size 64 --bank-size 512                                   # quick start on a CPU, no files
  python osessl.py --dataset imagefolder --data-dir data/cifar100       # offline CIFAR-100 (a GPU run)
  torchrun --standalone --nproc_per_node=4 osessl.py --dataset cifar100  # the paper's run, 4 GPUs
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
      osessl.py --dataset cifar100                                      # and node_rank=1 on the other
  ReSA baseline, step for step: add --lambda-proto 0 --mu-mix 0
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import operator
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = 1

# The method (sections 1-5): functions of tensors, copyable one by one; osessl_loss is all of L (objective and
# training_step then wire it to the networks, the bank and the optimiser).
#   B    images per step on this process; B_g = B x processes, the global batch (one process: B_g = B)
#   C    classes, one labeled exemplar each (S each with --exemplars-per-class S: the paper's "Ours*");
#        K memory-bank entries; k neighbours per class
#   d    embedding size; e backbone feature size (512 for ResNet-18 at width 64, 2048 for ResNet-50)
#   h    backbone features f(x), (., e): what ReSA's Sinkhorn compares (they cluster better than z)
#   z    embeddings norm(g(f(x))), (., d), unit length: what every loss compares
#   _m   the momentum network's (the paper's prime): z_weak_m is z'_1; no gradient ever reaches it
#   weak, strong, mix: the paper's views 1 and 2 and the mixup image (the paper's subscript m); z_ex: z_l
#   c    prototypes (C, d); p, p_m: student and teacher soft assignments to them


# ============ 1. ReSA, the base learner: Sinkhorn targets and L_resa ============
def soft_cross_entropy(target, logits):
    """CE(target, logits) = -(target * log_softmax(logits)).sum(-1).mean(): rows of `target` are
    distributions over the columns of `logits`."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def sinkhorn(scores, eps=0.05, iters=3, all_reduce=None):
    """ReSA's target A: Sinkhorn-Knopp on exp(scores / eps). scores (B, B_g): cosine similarities of
    this process's h_weak (detached) to h_weak_m of the global batch. Alternately normalises columns and
    rows: A's rows sum to 1, its columns approach equal mass (exactly only after many iterations; ReSA
    uses 3). all_reduce(t): sums t over the processes in place, when the B_g columns' rows are spread
    over several (torch.distributed.all_reduce); None: this process holds them all."""
    q = torch.exp((scores - 1) / eps)  # cosines are at most 1: no overflow, and the shift cancels below
    for _ in range(iters):
        col = q.sum(0, keepdim=True)
        if all_reduce is not None:
            all_reduce(col)
        q = q / col
        q = q / q.sum(1, keepdim=True)
    return q


def resa_loss(z_weak, z_strong, z_weak_m, z_strong_m, A, temperature=0.4):
    """L_resa: each view's embedding predicts, over the other view's momentum embeddings of the global
    batch, the Sinkhorn target A: (CE(A, z_weak z_strong_m^T / T) + CE(A, z_strong z_weak_m^T / T)) / 2.
    z_weak, z_strong: (B, d); z_weak_m, z_strong_m: (B_g, d), no gradient; A: (B, B_g)."""
    return (soft_cross_entropy(A, z_weak @ z_strong_m.T / temperature)
            + soft_cross_entropy(A, z_strong @ z_weak_m.T / temperature)) / 2


# ============ 2. Exemplar-guided prototype construction: memory bank, discriminative score ============
class MemoryBank(nn.Module):
    """M: a FIFO queue of the last K momentum embeddings z_weak_m of unlabeled images, feats (K, d).
    `ids` records which training image each slot holds (for the neighbour-precision diagnostic only).
    select_dim > 0 (--select-space encoding): it also keeps their normalised backbone features h_weak_m,
    select (K, e), which then choose the neighbours. Pointer and fill count are buffers, saved and loaded
    with the state_dict."""

    def __init__(self, size, dim, device=None, select_dim=0):
        super().__init__()
        self.register_buffer("feats", torch.zeros(size, dim, device=device))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("select", torch.zeros(size, select_dim, device=device) if select_dim else None)

    @torch.no_grad()
    def enqueue(self, feats, ids=None, select=None):
        if (select is None) != (self.select is None):
            raise ValueError("select: give the entries' backbone features exactly when the bank keeps them "
                             "(select_dim > 0)")
        K = len(self.feats)
        slots = (self.ptr + torch.arange(len(feats), device=feats.device)) % K
        self.feats[slots] = feats
        if ids is not None:
            self.ids[slots] = ids
        if select is not None:
            self.select[slots] = select
        self.ptr.copy_((self.ptr + len(feats)) % K)
        self.filled.copy_((self.filled + len(feats)).clamp(max=K))

    def valid(self):
        """(K,) bool: the slots filled so far; only they take part."""
        return torch.arange(len(self.feats), device=self.feats.device) < self.filled


def discriminative_scores(feats, exemplars, alpha=0.75):
    """s(c, j) = alpha <m_j, z_l^c> - (1 - alpha) max_{c' != c} <m_j, z_l^c'>: bank entry m_j scores
    high for class c when it is close to c's exemplar and far from every other class's, so an entry
    close to its own exemplar but closer still to another is not chosen. feats: (K, d) bank entries,
    exemplars: (C, d) exemplar embeddings (pass them detached), both L2-normalised -> (C, K)."""
    if len(exemplars) < 2:
        raise ValueError(f"exemplars: the discriminative score compares each exemplar with the nearest other, so it "
                         f"needs at least 2, got {len(exemplars)}")
    sim = exemplars @ feats.T                                  # (C, K)
    top2 = sim.topk(2, dim=0)                                  # best and second-best exemplar per entry
    is_best = torch.arange(sim.shape[0], device=sim.device)[:, None] == top2.indices[0][None]
    other = torch.where(is_best, top2.values[1][None], top2.values[0][None])
    return alpha * sim - (1 - alpha) * other


def class_anchor(z):
    """(C, S, d) -> (C, d): the direction of each class's S labeled embeddings, their normalised mean (the
    prototypical-network centre); S = 1: the exemplar itself, untouched (the paper's one-shot method)."""
    return z[:, 0] if z.shape[1] == 1 else F.normalize(z.mean(1), dim=-1)


def build_prototypes(z_ex, feats, valid, k=8, alpha=0.75, tau_w=1.0, select_by=None, select_feats=None):
    """The prototype of class c: c^c = norm(sum_j pi^(c,j) q^(c,j)) over P^c = {z_l^c} U S_c, S_c the
    top-k bank entries by s(c, .), with soft weights pi^(c,.) = softmax_j(<z_l^c, q^(c,j)> / tau_w).
    z_ex: (C, d) online exemplar embeddings z_l, with gradient (it reaches the network through the
    weights and as a member); feats: (K, d) bank entries, no gradient; valid: (K,) bool, the filled
    slots (the others get weight 0); select_by: (C, d) other exemplar embeddings that score the bank
    instead (--exemplar-select momentum), for the choice only; select_feats (K, e): other features of the
    same entries that select_by (then (C, e)) scores instead of feats (--select-space encoding: both
    normalised backbone features h). The top-k choice is discrete and passes no gradient.
    S labeled images per class (z_ex and select_by (C, S, .)): all S are members, and their class_anchor
    takes z_l^c's place in the score and the weights. Returns prototypes (C, d), neighbour indices
    (C, k), weights (C, S + k) (the first S columns: the labeled members)."""
    if k > len(feats):
        raise ValueError(f"k = {k} neighbours per class is more than the memory bank's {len(feats)} entries")
    if select_feats is not None and select_by is None:
        raise ValueError("select_feats: other features of the entries need the exemplars' features in that space "
                         "(select_by)")
    per_class = lambda z: z if z.dim() == 3 else z[:, None]  # (C, d) is S = 1
    z_ex = per_class(z_ex)
    S = z_ex.shape[1]
    key = class_anchor(z_ex if select_by is None else per_class(select_by))
    entries = feats if select_feats is None else select_feats
    scores = discriminative_scores(entries, key.detach(), alpha).masked_fill(~valid[None], float("-inf"))
    top, idx = scores.topk(k, dim=1)                           # a discrete choice: no gradient
    members = torch.cat([z_ex, feats[idx]], 1)                 # (C, S + k, d)
    logits = (class_anchor(z_ex)[:, None] * members).sum(-1) / tau_w
    logits = torch.cat([logits[:, :S], logits[:, S:].masked_fill(top == float("-inf"), float("-inf"))], 1)
    weights = logits.softmax(1)
    return F.normalize((weights[..., None] * members).sum(1), dim=-1), idx, weights


def neighbour_precision(nbr, bank, labels):
    """Diagnostic, never a loss: the fraction of chosen (filled) neighbours nbr (C, k) of a MemoryBank
    whose true label (labels: (N,) of the training images) is their exemplar's class c. It reads
    labels that training never uses."""
    valid = bank.valid()[nbr]
    hit = (labels[bank.ids[nbr]] == torch.arange(len(nbr), device=nbr.device)[:, None]) & valid
    return hit.sum() / valid.sum().clamp_min(1)


# ============ 3. Exemplar-guided prototype learning: L_proto = L_align + L_disp ============
def assign(z, prototypes, tau):
    """Soft assignment to the prototypes, p = softmax(z c^T / tau): (N, d) x (C, d) -> (N, C). The
    student uses tau_s = 0.1; the teacher p_m uses momentum embeddings, detached prototypes and the
    sharper tau_t = 0.04."""
    return (z @ prototypes.T / tau).softmax(-1)


def align_loss(z_weak, z_strong, prototypes, p_weak_m, p_strong_m, tau_s=0.1):
    """L_align, dual-view alignment: each view predicts the other view's teacher assignment,
    (CE(p_strong_m, z_weak c^T / tau_s) + CE(p_weak_m, z_strong c^T / tau_s)) / 2. z_weak, z_strong: (B, d);
    prototypes: (C, d); p_weak_m, p_strong_m: (B, C), no gradient. Its gradient on one z_weak,i is
    (E_p[c] - E_p_strong_m[c]) / (2 B tau_s): z moves towards the prototype centroid of its target; through
    the prototypes it also reaches the exemplars (build_prototypes)."""
    return (soft_cross_entropy(p_strong_m, z_weak @ prototypes.T / tau_s)
            + soft_cross_entropy(p_weak_m, z_strong @ prototypes.T / tau_s)) / 2


def dispersion_loss(prototypes, tau_s=0.1, mode="mean"):
    """L_disp pushes the C prototypes (C, d) apart. mean (the paper's text): the mean of
    <c^c, c^c'> / tau_s over pairs c != c', every pair pushed equally. logsumexp (the contrastive
    form): (1/C) sum_c log mean_{c' != c} exp(<c^c, c^c'> / tau_s), the closest pairs pushed hardest."""
    C = prototypes.shape[0]
    sim = prototypes @ prototypes.T / tau_s
    off = ~torch.eye(C, dtype=torch.bool, device=sim.device)
    if mode == "mean":
        return sim.masked_fill(~off, 0).sum() / (C * (C - 1))
    return (torch.logsumexp(sim.masked_fill(~off, float("-inf")), dim=1) - math.log(C - 1)).mean()


# ============ 4. Exemplar-guided interpolation consistency: L_mix = L_mix_proto + L_mix_ins ============
# A mixed image x_mix,i = beta_i x_weak,i + (1 - beta_i) x_strong,r(i) (weak view of i, strong view of its
# partner r(i), beta_i ~ Beta(zeta, zeta)) must predict the same mixture of its two sources' targets.
def interpolation_targets(beta, first, second):
    """beta_i first_i + (1 - beta_i) second_i for beta (B,) and distributions first, second (B, N)."""
    return beta[:, None] * first + (1 - beta[:, None]) * second


def instance_mix_target(beta, own, partner, n_global):
    """Target over the 2 B_g momentum embeddings [z_weak_m ; z_strong_m]: beta_i on column own_i (weak
    view of i), 1 - beta_i on column B_g + partner_i (strong view of the partner); indices are global."""
    target = torch.zeros(len(beta), 2 * n_global, dtype=beta.dtype, device=beta.device)
    target.scatter_(1, own[:, None], beta[:, None])
    return target.scatter_add_(1, n_global + partner[:, None], 1 - beta[:, None])


def mix_proto_loss(z_mix, prototypes, target, tau_s=0.1):
    """L_mix_proto = CE(p_mix, z_mix c^T / tau_s): z_mix (B, d) online embeddings of the mixed images;
    target p_mix (B, C), the interpolated teacher assignments. Pass detached prototypes (our choice):
    mixed points move, prototypes are not dragged towards class boundaries."""
    return soft_cross_entropy(target, z_mix @ prototypes.T / tau_s)


def mix_instance_loss(z_mix, keys, target, temperature=0.4):
    """L_mix_ins = CE(target, z_mix [z_weak_m ; z_strong_m]^T / T): keys (2 B_g, d) momentum embeddings,
    no gradient; target (B, 2 B_g) from instance_mix_target."""
    return soft_cross_entropy(target, z_mix @ keys.T / temperature)


# ============ 5. The objective L = L_resa + lambda L_proto + mu L_mix, and the training step ============
def osessl_loss(z_weak, z_strong, h_weak, z_weak_m, z_strong_m, h_weak_m, z_ex=None, bank=None, bank_valid=None,
                select_by=None, z_mix=None, beta=None, partner=None, first_row=0, lambda_proto=1.0, mu_mix=1.0, k=8,
                alpha=0.75, tau_w=1.0, tau_s=0.1, tau_t=0.04, resa_temp=0.4, sinkhorn_eps=0.05, sinkhorn_iters=3,
                dispersion="mean", all_reduce=None, bank_select=None):
    """L = L_resa + lambda (L_align + L_disp) + mu (L_mix_proto + L_mix_ins), from embeddings alone.
    Online network, this process's B images, with gradient: z_weak, z_strong (B, d), h_weak (B, e).
    Momentum network, the global batch (this process's rows from first_row): z_weak_m, z_strong_m (B_g, d),
    h_weak_m (B_g, e). Without z_ex, L is ReSA's. z_ex (C, d): the exemplars' online embeddings (row c:
    class c; (C, S, d) with S per class), with gradient; select_by (C, d) (or (C, S, d)): others that choose
    their neighbours (default z_ex); bank
    (K, d), bank_valid (K,): the memory bank's entries and filled slots; bank_select (K, e): the entries'
    normalised backbone features, scored by select_by (then the exemplars' normalised h, (C, [S,] e)) to choose
    the neighbours (--select-space encoding). z_mix (B, d): online embeddings of x_mix,i = beta_i x_weak,i
    + (1 - beta_i) x_strong,partner_i (beta, partner: (B,); partner indexes the global batch).
    all_reduce: see sinkhorn. Returns L, its terms (detached; with the entropies of the
    teacher assignments, a diagnostic) and the chosen neighbours (C, k) (None without exemplars).
    Under DDP: the momentum outputs all-gathered in rank order, the same B on every process, first_row =
    rank x B, the same z_ex (every exemplar), select_by, bank and bank_select on every process, and
    all_reduce=torch.distributed.all_reduce."""
    B, z_weak_m, z_strong_m = len(z_weak), z_weak_m.detach(), z_strong_m.detach()  # the momentum side: sg
    if not 0 <= first_row <= len(z_weak_m) - B or (len(z_weak_m) > B and all_reduce is None):
        raise ValueError(f"a global batch of {len(z_weak_m)} with {B} rows here from row {first_row}: give this "
                         "process's first_row, and all_reduce when the other rows live on other processes")
    if z_mix is not None and z_ex is None:
        raise ValueError("L_mix needs the exemplars' prototypes: give z_ex with z_mix")
    with torch.no_grad():  # ReSA's target, from the online and momentum backbone features
        A = sinkhorn(F.normalize(h_weak, dim=-1) @ F.normalize(h_weak_m, dim=-1).T, sinkhorn_eps, sinkhorn_iters,
                     all_reduce)
    terms = {"resa": resa_loss(z_weak, z_strong, z_weak_m, z_strong_m, A, resa_temp)}
    loss, nbr, mine = terms["resa"], None, slice(first_row, first_row + B)
    if z_ex is not None:
        c, nbr, _ = build_prototypes(z_ex, bank, bank_valid, k, alpha, tau_w, select_by, bank_select)
        with torch.no_grad():  # teacher assignments of the global batch against sg(c)
            p_weak_m, p_strong_m = assign(z_weak_m, c, tau_t), assign(z_strong_m, c, tau_t)
            entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1)  # nats; log C = uniform
            terms["assign_entropy"] = entropy(p_weak_m).mean()  # how sharp each image's target is
            terms["usage_entropy"] = entropy(p_weak_m.mean(0))  # how evenly the batch spreads over the C
        terms["align"] = align_loss(z_weak, z_strong, c, p_weak_m[mine], p_strong_m[mine], tau_s)
        terms["disp"] = dispersion_loss(c, tau_s, dispersion)
        loss = loss + lambda_proto * (terms["align"] + terms["disp"])
        if z_mix is not None:
            target = interpolation_targets(beta, p_weak_m[mine], p_strong_m[partner])
            terms["mix_proto"] = mix_proto_loss(z_mix, c.detach(), target, tau_s)
            own = torch.arange(first_row, first_row + B, device=beta.device)
            target = instance_mix_target(beta, own, partner, len(z_weak_m))
            terms["mix_ins"] = mix_instance_loss(z_mix, torch.cat([z_weak_m, z_strong_m]), target, resa_temp)
            loss = loss + mu_mix * (terms["mix_proto"] + terms["mix_ins"])
    terms["loss"] = loss
    return loss, {name: t.detach() for name, t in terms.items()}, nbr


def objective(run, x_weak, x_strong, ids, rnd):
    """L for this process's weak and strong views (B, 3, H, W), wired as the paper does: the mixed image
    is the weak view of i and the strong view of its partner anywhere in the global batch; both networks
    forward every view separately (the exemplars alone or with the weak views: --exemplar-bn), the
    momentum outputs are gathered over the processes, and osessl_loss computes L. ids: the global
    batch's sample ids (training_step enqueues them). Returns L, its terms and the bank's next entries:
    z_weak_m of the global batch (--select-space encoding: with their normalised h_weak_m, a pair)."""
    cfg, B = run.cfg, len(x_weak)
    rows, views, x_ex, mix = slice(run.rank * B, (run.rank + 1) * B), [x_weak, x_strong], None, {}
    if cfg.mu_mix > 0:
        mix = dict(beta=rnd.beta[rows], partner=rnd.partner[rows])
        b = mix["beta"].view(-1, 1, 1, 1)
        views.append(b * x_weak + (1 - b) * gather(x_strong)[mix["partner"]])
    if cfg.uses_exemplars:  # one weak view of each of this process's exemplars
        mine = slice(run.rank, None, run.world)
        x_ex = run.to_net(augment(run.exemplar_images[mine], {k: v[mine] for k, v in rnd.exemplar.items()},
                                  run.mean, run.std, strong=False))
    joint, by_momentum = cfg.exemplar_bn == "joint", cfg.exemplar_select == "momentum"
    in_h = cfg.select_space == "encoding"  # the neighbours chosen by backbone features, not embeddings
    with torch.no_grad(), run.autocast():
        h_weak_m, (z_weak_m, z_strong_m), z_ex_m, h_ex_m = forward_views(
            run.momentum_net, [x_weak, x_strong], x_ex if by_momentum else None, joint, in_h)
    h_weak_m, z_weak_m, z_strong_m = gather(h_weak_m), gather(z_weak_m), gather(z_strong_m)
    with run.autocast():
        h_weak, (z_weak, z_strong, *z_mix), z_ex, h_ex = forward_views(run.online, views, x_ex, joint,
                                                                       in_h and not by_momentum)
    exemplars = {}
    if x_ex is not None:  # which exemplar vectors choose the neighbours: --exemplar-select, --select-space
        if in_h:  # the choice passes no gradient: detached before it is gathered
            select_by = F.normalize(h_ex_m if by_momentum else h_ex, dim=-1).detach()
        else:
            select_by = z_ex_m if by_momentum else None
        exemplars = dict(z_ex=all_exemplars(run, z_ex), bank=run.bank.feats, bank_valid=run.bank.valid(),
                         select_by=None if select_by is None else all_exemplars(run, select_by),
                         bank_select=run.bank.select)
    loss, terms, nbr = osessl_loss(z_weak, z_strong, h_weak, z_weak_m, z_strong_m, h_weak_m, **exemplars,
                                   z_mix=z_mix[0] if z_mix else None, **mix, first_row=run.rank * B,
                                   **run.loss_settings, all_reduce=run.all_reduce)
    if nbr is not None:
        terms["nbr_precision"] = neighbour_precision(nbr, run.bank, run.labels)
    return loss, terms, (z_weak_m, F.normalize(h_weak_m, dim=-1)) if in_h else z_weak_m


def training_step(run, x_weak, x_strong, ids, rnd, lr, m):
    """One optimiser step: L, backward, SGD, EMA of the momentum network, enqueue into the bank.
    Returns the loss terms as device tensors."""
    loss, terms, entries = run.objective(run, x_weak, x_strong, ids, rnd)
    for group in run.opt.param_groups:
        group["lr"] = lr
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    ema_update(run.momentum_net, run.net, m)
    if run.cfg.uses_exemplars:
        z_weak_m, h_weak_m = entries if run.cfg.select_space == "encoding" else (entries, None)
        run.bank.enqueue(z_weak_m, ids, h_weak_m)
    return terms


# Engineering notes, kept out of the method's docstrings. Nothing in sections 1-5 reads a value back to
# the host (MemoryBank's pointer and fill count live on the device; dispersion_loss masks rather than
# indexing with a boolean mask), so a step never waits for the GPU; --compile makes objective one graph
# (both networks, Sinkhorn, prototypes, every term). Tests check both, and that 2 processes compute 1's L.


# ============ 6. Networks: ResNet-18 or -50 (CIFAR stem), projector, momentum copies ============
def resnet_block(block, cin, planes, stride):
    """torchvision's BasicBlock or Bottleneck, with the 1x1 projection shortcut where the shape changes."""
    cout = planes * block.expansion
    shortcut = None if stride == 1 and cin == cout else \
        nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return block(cin, planes, stride, shortcut)


def resnet_blocks(arch):
    """--arch: torchvision's block type and blocks per stage."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]


class ResNet(nn.Module):
    """torchvision's resnet18 or resnet50 without fc, with the CIFAR stem (3x3 conv, stride 1, no max-pool)
    or torchvision's own (7x7 conv, stride 2, max-pool) for larger images. Same module names, so state
    dicts interchange with torchvision's (a test checks parity); `width` scales every stage (64 = the real
    networks; smaller widths keep CPU tests fast). stem "cifar-pad" is ReSA's official CIFAR encoder: the
    CIFAR stem after zero-padding the input by 1 px (no parameters, so the state dict is the same).
    Features h: 8 x width (ResNet-18: 512) or 32 x width (ResNet-50: 2048)."""

    def __init__(self, width=64, stem="cifar", arch="resnet18"):
        super().__init__()
        cifar, (block, depths) = stem in ("cifar", "cifar-pad"), resnet_blocks(arch)
        self.pad = nn.ZeroPad2d(1) if stem == "cifar-pad" else nn.Identity()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, (n, stride) in enumerate(zip(depths, (1, 2, 2, 2))):
            planes = width * 2 ** i
            blocks = [resnet_block(block, cin, planes, stride)]
            cin = planes * block.expansion
            blocks += [resnet_block(block, cin, planes, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.dim = cin
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.pad(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Network(nn.Module):
    """Encoder f and projector g. One call forwards several views *separately* (each its own
    BatchNorm batch, as ReSA does), so that DDP sees one forward per step."""

    def __init__(self, width=64, hidden=2048, dim=512, stem="cifar", arch="resnet18"):
        super().__init__()
        self.encoder = ResNet(width, stem, arch)
        e = self.encoder.dim
        self.projector = nn.Sequential(  # biases before BN would be cancelled by it
            nn.Linear(e, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False), nn.BatchNorm1d(dim, affine=False))

    def forward(self, *views, every_h=False):
        """Returns h of the first view (B, e) (every_h: a list, h of every view) and z = norm(g(f(x))) of
        every view, in float32 (the losses' precision, also under bf16 autocast)."""
        hs = [self.encoder(v) for v in views]
        full = lambda t: t.to(torch.get_default_dtype())
        zs = [F.normalize(full(self.projector(h)), dim=-1) for h in hs]
        return [full(h) for h in hs] if every_h else full(hs[0]), zs


def differentiable_sum(x):
    """Sum of x over processes whose backward sums the gradients too (each process's gradient then
    reaches whatever it contributed)."""
    from torch.distributed.nn.functional import all_reduce
    with warnings.catch_warnings():  # torch 2.14 deprecates it for a private module; 2.11 has only this
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(x)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU processes (gloo): torch's SyncBatchNorm runs on GPUs only. Batch
    statistics are summed over processes with a differentiable all-reduce."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        n = torch.tensor(float(x.numel() // x.shape[1]))
        stats = differentiable_sum(torch.cat([x.sum(dims), (x * x).sum(dims), n.view(1)]))
        c = x.shape[1]
        total = stats[-1]
        mean = stats[:c] / total
        var = stats[c:2 * c] / total - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module, device):
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module


@torch.no_grad()
def ema_update(momentum_net, online_net, m):
    """theta' <- m theta' + (1 - m) theta, after each optimiser step."""
    torch._foreach_lerp_(list(momentum_net.parameters()), list(online_net.parameters()), 1 - m)


def ema_schedule(step, total_steps, start):
    return 1 - (1 - start) * (math.cos(math.pi * step / total_steps) + 1) / 2


# ============ 7. Data and the one-shot setting ============
# Every split is decoded once into a uint8 tensor (N, 3, H, W) that lives on the training device;
# augmentation then runs there too, so the training loop never touches PIL or a DataLoader.

def load_cifar(cfg, node=(0, 1)):
    """torchvision's CIFAR, downloaded when missing. Under torchrun the processes take turns, so that one
    downloads while the others wait: rank 0, then the first process of each other node (which may have
    its own disk), then the rest, which find the files there. A failure anywhere stops all (agreed)."""
    import torchvision
    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    splits, failed = None, None
    for my_turn in (dist.get_rank() == 0, node[0] == 0, True) if dist.is_initialized() else (True,):
        if my_turn and splits is None and failed is None:
            try:
                with removed_on_failure(cfg.data_dir):  # a failed download leaves nothing behind
                    splits = [cls(cfg.data_dir, train=t, download=True) for t in (True, False)]
            except Exception as e:  # offline machines land here
                folder = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
                failed = UsageError(f"could not download {cfg.dataset} into {cfg.data_dir} ({type(e).__name__}); "
                                    f"offline, copy torchvision's {folder}/ into --data-dir, or give an ImageFolder "
                                    "copy (DIR/train/<class>/*, DIR/test/<class>/*) as --dataset imagefolder "
                                    "--data-dir DIR")
        stop_all_if_any_failed(failed, f"{cfg.dataset} not loaded")
    out = []
    for s in splits:
        out += [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)]
    return (*out, len(splits[0].classes))


@contextlib.contextmanager
def removed_on_failure(folder):
    """If the body fails, remove what it created: `folder` and the parents it made, when it did not
    exist; else the entries new in it. Nothing that was there before is touched."""
    folder = top = os.path.abspath(folder)
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    before = set(os.listdir(folder)) if os.path.isdir(folder) else None
    try:
        yield
    except BaseException:
        new = [top] if before is None else [os.path.join(folder, n) for n in set(os.listdir(folder)) - before]
        for path in filter(os.path.lexists, new):  # (a folder that could not be made is not there)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        raise


def decode_image(path, size):
    """One image file -> uint8 (3, S, S): RGB (from grayscale, palette, RGBA, CMYK, ...), the short side
    resized to S and centre-cropped. Returns the error's name for an unreadable file (it runs in
    DataLoader workers, which cannot stop the run with a one-line error). Module level: workers pickle it."""
    from PIL import Image
    from torchvision.transforms import functional as TF
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at the smallest scale that still covers S (cheap)
            im = im.convert("RGB")
            return TF.pil_to_tensor(TF.center_crop(TF.resize(im, size) if min(im.size) != size else im, size))
    except Exception as e:
        return type(e).__name__


def list_imagefolder(root, split):
    """DIR/split/<class>/* as torchvision's ImageFolder finds it (hidden files such as ._* and .DS_Store
    skipped): classes, paths and labels, without decoding a pixel."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS
    top = os.path.join(root, split)
    if not os.path.isdir(top):
        raise UsageError(f"{top} is not a directory: --data-dir must hold train/<class>/* and test/<class>/*")
    is_image = lambda p: p.lower().endswith(IMG_EXTENSIONS) and not os.path.basename(p).startswith(".")
    try:
        return ImageFolder(top, is_valid_file=is_image)
    except FileNotFoundError as e:  # no class folder, or a class folder without an image
        raise UsageError(f"{top}: {e} (an empty class folder needs an image, or must go)") from None


def load_imagefolder_split(root, split, size=0, ds=None, node=(0, 1)):
    """Decode DIR/split/<class>/* (ds: its listing) once into uint8 (N, 3, S, S), on the CPU cores, and
    cache it (cache_path). node (local rank, processes on this node): under torchrun
    local rank 0 decodes and writes the cache while the others wait, then they read it (every process
    takes part in one agreement, so that a failure anywhere stops all). size 0: S is the first readable
    image's short side. Returns images, labels, classes."""
    ds = ds or list_imagefolder(root, split)
    top, (local_rank, local_world) = os.path.join(root, split), node
    paths, labels = [p for p, _ in ds.samples], torch.tensor(ds.targets)
    size = size or first_image_size(paths, top)
    listing = [size] + [(os.path.relpath(p, root), os.path.getsize(p)) for p in paths]
    key = hashlib.sha1(json.dumps(listing).encode()).hexdigest()  # a changed file or size: decode anew
    cache, failed, x = cache_path(root, split), None, None
    if local_rank == 0 or local_world == 1:
        try:
            x = read_cache(cache, key, labels, size)
            if x is None:
                x = decode_split(ds, paths, size, top, node)
                tmp = f"{cache}.{os.uname().nodename}.{os.getpid()}.tmp"  # several runs may write at once
                try:
                    os.makedirs(os.path.dirname(cache), exist_ok=True)
                    torch.save({"key": key, "x": x, "y": labels}, tmp)
                    os.replace(tmp, cache)
                except (OSError, RuntimeError):  # (torch.save's full disk is a RuntimeError)
                    with contextlib.suppress(OSError):
                        os.remove(tmp)  # no writable cache, or no room: decode again next time
        except Exception as e:
            failed = e
    stop_all_if_any_failed(failed, f"{top}: not decoded")  # the others waited here for local rank 0's decode
    if x is None:  # the cache local rank 0 wrote (or, where it could write none, decoded here too)
        x = read_cache(cache, key, labels, size)
        x = decode_split(ds, paths, size, top, node) if x is None else x
    return x, labels, ds.classes


def stop_all_if_any_failed(failed, what):
    """One agreement of every process: if any failed, all stop, the failing ones with their own error."""
    if dist.is_initialized() and agree(int(failed is not None)):
        raise failed or UsageError(f"{what}, see the failing process's error")
    if failed:
        raise failed


def cache_path(root, split):
    """Where a split's decoded tensor is cached: beside the data, or, where the data folder is read-only
    (a shared dataset store), in $XDG_CACHE_HOME/osessl (default ~/.cache/osessl) under its path's hash."""
    if os.access(root, os.W_OK):
        return os.path.join(root, f".osessl-cache-{split}.pt")
    home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "osessl")
    return os.path.join(home, f"{hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:16]}-{split}.pt")


def first_image_size(paths, top):
    """The short side of the first image that opens (the others are decoded to it)."""
    from PIL import Image
    for p in paths:
        try:
            with Image.open(p) as im:
                return min(im.size)
        except OSError:
            continue
    raise UsageError(f"{top}: no image in it can be read")


def read_cache(cache, key, labels, size):
    """The cached split if it is this listing's, else None. Tensors and plain data only: a crafted cache
    cannot run code, a wrong or damaged one is decoded anew (and rewritten)."""
    try:
        c = torch.load(cache, weights_only=True)
        x = c["x"]
        if c["key"] == key and x.dtype == torch.uint8 and x.shape == (len(labels), 3, size, size) \
                and torch.equal(c["y"], labels):
            return x
    except Exception:
        pass
    return None


def decode_split(ds, paths, size, top, node=(0, 1)):
    """Every image of the listing decoded in DataLoader workers, every unreadable file reported at once.
    node (local rank, processes on this node): each process of the node will hold a copy; local rank 0
    decodes alone, the others only when it could not write the cache, then all at once."""
    (local_rank, local_world), cores = node, os.cpu_count() or 1
    need, have = len(paths) * 3 * size * size * local_world, host_memory_bytes()
    if need > have:
        raise UsageError(f"{top} at {size} x {size} px needs {need / 2 ** 30:.2f} GiB for the {local_world} "
                         f"process(es) of this node, more than its {have / 2 ** 30:.2f} GiB of free memory: give a "
                         "smaller --image-size")
    print(f"osessl: decoding {top} ({len(paths)} images at {size} x {size} px, cached for the next run)", flush=True)
    ds.loader = partial(decode_image, size=size)
    workers = 0 if len(paths) < 2000 else max(1, cores // (local_world if local_rank else 1))  # small: no workers
    batches = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers, collate_fn=list)
    x, bad, t0, t_print = torch.empty(len(paths), 3, size, size, dtype=torch.uint8), [], time.time(), time.time()
    for b, batch in enumerate(batches):
        for i, (img, _) in enumerate(batch, b * 256):
            if isinstance(img, str):
                bad.append(f"{paths[i]} ({img})")
            else:
                x[i] = img
        if time.time() - t_print > 10:
            t_print = time.time()
            print(f"  decoding {top}: {i + 1}/{len(paths)} ({(i + 1) / (t_print - t0):.0f}/s)", flush=True)
    if bad:
        raise UsageError(f"{len(bad)} unreadable image(s) in {top}: {', '.join(bad[:3])}{', ...' * (len(bad) > 3)}: "
                         "remove or replace them")
    return x


def host_memory_bytes():
    """Memory this machine has available now (Linux), or its physical memory."""
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def make_synthetic(num_classes, per_class, seed=0, size=32):
    """Class-structured images: each class is a random low-frequency colour layout, each image that
    layout at a random brightness plus pixel noise. Learnable, tiny, needs no files."""
    g = torch.Generator().manual_seed(seed)
    layouts = torch.rand(num_classes, 3, 4, 4, generator=g)

    def sample(n):
        y = torch.arange(n) % num_classes
        x = F.interpolate(layouts[y], size=size, mode="bilinear", align_corners=False)
        x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + 0.15 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y
    return (*sample(num_classes * per_class), *sample(num_classes * max(1, per_class // 4)), num_classes)


def load_data(cfg, check=None, node=(0, 1)):
    """Returns train_x, train_y, test_x, test_y (uint8 images, int64 labels) and the number of classes.
    check(train_y, num_classes), if given, runs before an ImageFolder's pixels are decoded (and cached)."""
    if cfg.dataset in ("cifar10", "cifar100"):
        data = load_cifar(cfg, node)
    elif cfg.dataset == "imagefolder":
        if not os.path.isdir(cfg.data_dir):
            raise UsageError(f"--data-dir {cfg.data_dir} does not exist: point it at a folder holding train/ and test/")
        train, test = list_imagefolder(cfg.data_dir, "train"), list_imagefolder(cfg.data_dir, "test")
        if test.classes != train.classes:
            raise UsageError(f"{cfg.data_dir}: test/ and train/ hold different class folders ({len(test.classes)} and "
                             f"{len(train.classes)}): both need the same classes")
        if check:
            check(torch.tensor(train.targets), len(train.classes))
        tx, ty, _ = load_imagefolder_split(cfg.data_dir, "train", cfg.image_size, train, node)
        vx, vy, _ = load_imagefolder_split(cfg.data_dir, "test", tx.shape[-1], test, node)  # the training size
        data = (tx, ty, vx, vy, len(train.classes))
    else:
        data = make_synthetic(cfg.synthetic_classes, cfg.synthetic_per_class, seed=cfg.seed)
    tx, ty, vx, vy, num_classes = data
    if check and cfg.dataset != "imagefolder":
        check(ty, num_classes)
    if cfg.test_limit and cfg.test_limit < len(vx):
        keep = torch.randperm(len(vx), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.test_limit]
        vx, vy = vx[keep], vy[keep]
    return tx, ty, vx, vy, num_classes


def settle(cfg, size):
    """The settings that follow the image size S, made concrete (config.json and checkpoints record them)."""
    large = size > 64
    stem = ("imagenet" if large else "cifar") if cfg.stem == "auto" else cfg.stem
    blur = ("on" if large else "off") if cfg.blur == "auto" else cfg.blur
    return replace(cfg, stem=stem, blur=blur, image_size=size if cfg.dataset == "imagefolder" else cfg.image_size)


def device_free_bytes(device):
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_memory_bytes()


def select_exemplars(cfg, train_y, num_classes):
    """D_l: S = --exemplars-per-class distinct training indices per class, class by class (entries
    cS .. cS + S - 1 hold class c). Drawn with --exemplar-seed (this simulates the annotator, who looks at
    labels) or read from --exemplars."""
    S = cfg.exemplars_per_class
    if cfg.exemplars:
        try:
            with open(cfg.exemplars) as f:
                idx = json.load(f)
            ok = type(idx) is list and all(type(i) is int for i in idx) and len(set(idx)) == len(idx) \
                and all(0 <= i < len(train_y) for i in idx) \
                and torch.bincount(train_y[idx], minlength=num_classes).eq(S).all().item()
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"--exemplars {cfg.exemplars}: give a JSON list of {num_classes * S} training indices "
                             f"(0..{len(train_y) - 1}), {S} of each class, all different (--exemplars-per-class {S})")
        return torch.tensor(idx)[train_y[idx].argsort(stable=True)]
    g = torch.Generator().manual_seed(cfg.exemplar_seed)
    picks = []
    for c in range(num_classes):
        members = (train_y == c).nonzero().flatten()
        if len(members) < S:
            raise UsageError(f"class {c} has {len(members)} training images, fewer than --exemplars-per-class {S}")
        # S = 1 draws as it always has, so that one-shot runs keep their exemplars
        pick = torch.randint(len(members), (1,), generator=g) if S == 1 else torch.randperm(len(members), generator=g)
        picks.append(members[pick[:S]])
    return torch.cat(picks)


def unlabeled_indices(cfg, n_train, exemplar_idx):
    """D_u: the training split without the exemplars (default), optionally a seeded subset."""
    keep = torch.ones(n_train, dtype=torch.bool)
    if not cfg.keep_exemplars_in_unlabeled:
        keep[exemplar_idx] = False
    idx = keep.nonzero().flatten()
    if cfg.train_limit and cfg.train_limit < len(idx):
        subset = torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_limit]
        idx = idx[subset].sort().values
    return idx


def channel_stats(x, chunk_pixels=2 ** 22):
    """Per-channel mean and std of uint8 images, in [0, 1] units, in float64 chunks of about
    chunk_pixels pixels (about 100 MB each at any image size: the images may already fill the GPU)."""
    s = torch.zeros(3, dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s)
    for chunk in x.split(max(1, chunk_pixels // (x.shape[2] * x.shape[3]))):
        c = chunk.to(torch.float64) / 255
        s += c.sum((0, 2, 3))
        s2 += (c * c).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    dtype = torch.get_default_dtype()  # float32, or float64 under --float64
    return mean.to(dtype), (s2 / n - mean * mean).sqrt().to(dtype)


# ============ 8. Augmentation on the device: weak and strong views ============
# All random parameters of a step are drawn for the *global* batch from a generator seeded by
# (seed, step); each process then takes its rows. Augmentation is therefore a function of
# (seed, step, global sample index): independent of the number of processes and exact on resume.

def step_generator(seed, step, device):
    g = torch.Generator(device=device)
    g.manual_seed((seed << 32) + step)
    return g


def sample_view_params(n, g, size=32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """Per-sample parameters of one view: RandomResizedCrop box and flip (weak), colour jitter
    factors and order, grayscale and solarize coin flips (strong). Always drawn in full, so the
    random stream does not depend on which view uses them."""
    d = g.device
    rand = lambda *shape: torch.rand(*shape, generator=g, device=d)
    # RandomResizedCrop as torchvision samples it: up to `tries` boxes, the first that fits wins.
    area = size * size * (scale[0] + (scale[1] - scale[0]) * rand(n, tries))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n, tries)
    w = torch.sqrt(area * log_r.exp()).round()
    h = torch.sqrt(area / log_r.exp()).round()
    fits = (w >= 1) & (h >= 1) & (w <= size) & (h <= size)
    first = fits.int().argmax(1, keepdim=True)
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.full_like(found, size, dtype=w.dtype))
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.full_like(found, size, dtype=h.dtype))
    top = (rand(n) * (size - h + 1)).floor()
    left = (rand(n) * (size - w + 1)).floor()
    flip, jitter, u = rand(n) < 0.5, rand(n) < 0.8, rand(n, 4)
    # ColorJitter(0.4, 0.4, 0.2, 0.1): brightness, contrast, saturation factors in 1 +- v, hue shift in 0 +- 0.1
    # (Python constants, not a torch.tensor: on a GPU that would be a host-to-device copy, which waits)
    centre_spread = ((1, 0.4), (1, 0.4), (1, 0.2), (0, 0.1))
    factors = torch.stack([c + v * (2 * u[:, i] - 1) for i, (c, v) in enumerate(centre_spread)], 1)
    return dict(box=torch.stack([top, left, h, w], 1), flip=flip, jitter=jitter, factors=factors,
                order=rand(n, 4).argsort(1), gray=rand(n) < 0.2, solarize=rand(n) < 0.2)


def _gray(x):
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shift_hue(x, shift):
    """RGB -> HSV, rotate hue by `shift` (fraction of a turn), -> RGB; as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    sat = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta == 0, torch.zeros_like(hue), hue) / 6.0
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB in closed form: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6.0) % 6.0
        out.append(maxc - maxc * sat * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(out, 1)


def color_jitter(x, factors, order):
    """Brightness, contrast, saturation, hue with per-sample factors, in a per-sample random order
    (torchvision's ColorJitter shuffles the four operations for each image)."""
    f = factors.view(-1, 4, 1, 1, 1).unbind(1)
    for slot in range(4):
        op = order[:, slot].view(-1, 1, 1, 1)
        mean = _gray(x).mean((1, 2, 3), keepdim=True)
        x = torch.where(op == 0, x * f[0],
            torch.where(op == 1, f[1] * x + (1 - f[1]) * mean,
            torch.where(op == 2, f[2] * x + (1 - f[2]) * _gray(x),
                        _shift_hue(x, factors[:, 3])))).clamp(0, 1)
    return x


def gaussian_blur(x, sigma, kernel):
    """Per-sample Gaussian blur of (n, 3, H, W) images with sigma (n,) and an odd kernel size, reflect
    padding: torchvision's gaussian_blur for the whole batch at once, as two 1-D grouped convolutions."""
    n, c, H, W = x.shape
    r = kernel // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    k = (k / k.sum(1, keepdim=True))[:, None].expand(n, c, kernel).reshape(n * c, 1, kernel)
    y = F.pad(x.reshape(1, n * c, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, k[..., None, :], groups=n * c), k[..., :, None], groups=n * c)
    return y.reshape(n, c, H, W)


def augment(images, p, mean, std, strong):
    """uint8 images (B, 3, H, W) and per-sample parameters -> normalised float views (B, 3, H, W).
    One affine grid does crop, resize and flip for the whole batch; as in ReSA's official code, the
    weak view's crop is resampled bilinearly and the strong view's bicubically."""
    x = images.to(mean.dtype) / 255
    n, _, H, W = x.shape
    top, left, h, w = p["box"].unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(p["flip"], -w / W, w / W)
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [n, 3, H, W], align_corners=False)
    x = F.grid_sample(x, grid, mode="bicubic" if strong else "bilinear", padding_mode="border", align_corners=False)
    if strong:
        x = x.clamp(0, 1)  # cubic weights overshoot; PIL's bicubic saturates to 0..255 too
        x = torch.where(p["jitter"].view(-1, 1, 1, 1), color_jitter(x, p["factors"], p["order"]), x)
        x = torch.where(p["gray"].view(-1, 1, 1, 1), _gray(x).expand(-1, 3, -1, -1), x)
        if "blur" in p:  # large images (--blur); kernel 23 at 224 px, as BYOL's and ReSA's ImageNet recipes
            x = torch.where(p["blur"].view(-1, 1, 1, 1), gaussian_blur(x, p["sigma"], 2 * round(H / 20) + 1), x)
        x = torch.where(p["solarize"].view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)  # PIL's threshold 128
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def sample_beta(n, zeta, g):
    """Beta(zeta, zeta) from the step generator: a / (a + b) = sigmoid(log a - log b) for a, b ~ Gamma(zeta).

    torch.distributions.Beta takes no generator, hence the private _standard_gamma. In logs, because at a small
    zeta (--zeta takes any value above 0) Gamma(zeta) falls below the smallest float and is clamped there (both
    draws then give exactly 0.5): log Gamma(zeta) = log Gamma(zeta + 1) + log(U) / zeta, U uniform, in float64.
    """
    zetas = torch.full((n,), float(zeta) + 1, dtype=torch.float64, device=g.device)
    log_u = lambda: torch.rand(n, dtype=torch.float64, generator=g, device=g.device).neg().log1p()  # log U, U in (0, 1]
    log_a, log_b = (torch._standard_gamma(zetas, generator=g).log() + log_u() / zeta for _ in range(2))
    return torch.sigmoid(log_a - log_b).to(torch.get_default_dtype())


def step_randomness(seed, step, n_global, n_exemplars, zeta, device, size=32, blur=False):
    """Everything random in one training step, for the global batch, in a fixed order."""
    g = step_generator(seed, step, device)
    r = SimpleNamespace(weak=sample_view_params(n_global, g, size), strong=sample_view_params(n_global, g, size),
                        exemplar=sample_view_params(n_exemplars, g, size), beta=sample_beta(n_global, zeta, g),
                        partner=torch.randperm(n_global, generator=g, device=device))
    if blur:  # drawn last, so that runs without blur keep their random stream
        r.strong.update(blur=torch.rand(n_global, generator=g, device=device) < 0.5,
                        sigma=0.1 + 1.9 * torch.rand(n_global, generator=g, device=device))
    return r


# ============ 9. Config: the paper's CIFAR settings ============
class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, never as a traceback."""


def opt(default, help, choices="", at_least=None, above=None, at_most=None):
    """A Config field: its default, its --help, and what check_config accepts (choices: space-separated)."""
    return field(default=default, metadata=dict(help=help, choices=choices.split(), at_least=at_least, above=above,
                                                 at_most=at_most))


SEED = dict(at_least=0, at_most=2 ** 31 - 1)
LIMITS = (("at_least", ">=", operator.ge), ("above", ">", operator.gt), ("at_most", "<=", operator.le))


@dataclass
class Config:
    """One field per flag (--field-name); the reasons behind the open choices: README's flags table."""
    # data
    dataset: str = opt("cifar100", "cifar10 | cifar100 (downloaded) | imagefolder | synthetic (generated)",
                       "cifar10 cifar100 imagefolder synthetic")
    data_dir: str = opt("./data", "where CIFAR is downloaded, or the ImageFolder root (train/<class>/*, test/...)")
    train_limit: int = opt(0, "use only this many unlabeled training images (seeded subset; 0 = all)", at_least=0)
    test_limit: int = opt(0, "evaluate on only this many test images (seeded subset; 0 = all)", at_least=0)
    synthetic_classes: int = opt(10, "classes of --dataset synthetic", at_least=1)
    synthetic_per_class: int = opt(64, "training images per class of synthetic (a quarter as many to test)", at_least=1)
    image_size: int = opt(0, "imagefolder: S; images resized (short side) and centre-cropped once (0: first image's)")
    data_on: str = opt("auto", "images on the device | the host (batches pinned) | auto: device if in half its memory",
                       "auto device host")
    # the one-shot split
    exemplar_seed: int = opt(0, "seed that draws the labeled exemplars of each class", **SEED)
    exemplars_per_class: int = opt(1, "S labeled images per class (1: the paper's one-shot; more: its \"Ours*\")",
                                   at_least=1)
    exemplars: str = opt("", "JSON list of training indices, S of each class (instead of --exemplar-seed)")
    keep_exemplars_in_unlabeled: bool = opt(False, "paper silent: by default the exemplars leave D_u")
    exemplar_select: str = opt("momentum", "paper silent: the network whose exemplar embeddings choose neighbours",
                               "online momentum")
    exemplar_bn: str = opt("joint", "paper silent: exemplars in their own BatchNorm batch, or with the weak views",
                           "alone joint")
    # networks
    arch: str = opt("resnet18", "encoder: ResNet-18 (the paper's CIFAR and ImageNet-100) or -50 (its ImageNet-1K)",
                    "resnet18 resnet50")
    width: int = opt(64, "ResNet base width (64: the real networks; tests use 8)", at_least=1)
    stem: str = opt("auto", "cifar | cifar-pad (ReSA's official) | imagenet | auto (cifar up to 64 px)",
                    "auto cifar cifar-pad imagenet")
    proj_hidden: int = opt(2048, "projector hidden size", at_least=1)
    proj_dim: int = opt(512, "projector output size d", at_least=1)
    # optimisation
    epochs: int = opt(1000, "training epochs (the paper: 1000 on CIFAR)", at_least=1)
    batch_size: int = opt(256, "images per process and step, at least 2 (BatchNorm); global batch: x processes",
                          at_least=2)
    lr: float = opt(0.3, "learning rate for a global batch of 256 (scaled linearly)", above=0)
    weight_decay: float = opt(1e-4, "SGD weight decay", at_least=0)
    warmup_epochs: int = opt(2, "linear warm-up epochs, then cosine to --final-lr-ratio x lr", at_least=0)
    final_lr_ratio: float = opt(0.1, "learning rate at the end of the cosine, relative to lr", at_least=0)
    ema_start: float = opt(0.996, "momentum-network EMA coefficient at step 0, cosine to 1", at_least=0, at_most=1)
    # ReSA (section 1)
    sinkhorn_eps: float = opt(0.05, "Sinkhorn entropic regularisation", above=0)
    sinkhorn_iters: int = opt(3, "Sinkhorn iterations (ReSA: 3)", at_least=1)
    resa_temp: float = opt(0.4, "temperature of the ReSA and instance-mixup logits", above=0)
    # OSESSL (sections 2-5)
    lambda_proto: float = opt(1.0, "weight lambda of L_proto (0, with --mu-mix 0: ReSA)", at_least=0)
    mu_mix: float = opt(1.0, "weight mu of L_mix (1.0 on CIFAR, 0.25 on ImageNet)", at_least=0)
    bank_size: int = opt(4096, "memory bank size K", at_least=1)
    k: int = opt(8, "neighbours per class", at_least=1)
    alpha: float = opt(0.75, "discriminative score: own exemplar's weight", at_least=0, at_most=1)
    tau_w: float = opt(1.0, "temperature of the prototype member weights (the paper writes none)", above=0)
    tau_s: float = opt(0.1, "student temperature", above=0)
    tau_t: float = opt(0.04, "teacher temperature", above=0)
    zeta: float = opt(1.0, "mixup Beta(zeta, zeta) (paper silent; 1 = uniform)", above=0)
    blur: str = opt("auto", "strong-view Gaussian blur, ReSA's ImageNet recipe: on | off | auto (above 64 px)",
                    "auto on off")
    dispersion: str = opt("mean", "L_disp: mean (the paper's text) | logsumexp (closest pairs pushed hardest)",
                          "mean logsumexp")
    select_space: str = opt("embedding", "paper silent: the space whose cosines choose the neighbours, embeddings "
                            "z (the paper's) or backbone features h (ReSA's clustering space)", "embedding encoding")
    # the run
    seed: int = opt(0, "seed of the network init, epoch permutations and augmentation", **SEED)
    eval_every: int = opt(10, "in-training k-NN every N epochs and after the last (0: only after the last)", at_least=0)
    max_steps: int = opt(0, "stop after this many optimiser steps in all (0: every epoch)", at_least=0)
    keep_every: int = opt(0, "also keep every N-th epoch's checkpoint as epoch<N>.pt (0: none)", at_least=0)
    out: str = opt("", "run directory (default runs/<dataset>-<method>-<timestamp>)")
    overwrite: bool = opt(False, "allow writing into a --out that holds another run")
    resume: str = opt("", "checkpoint (last.pt) to continue from")
    compile: bool = opt(False, "torch.compile the augmentation and the whole objective")
    compile_mode: str = opt("default", "torch.compile mode", "default reduce-overhead max-autotune "
                            "max-autotune-no-cudagraphs")
    device: str = opt("", "cuda | cpu (default: cuda when available)")
    memory_format: str = opt("auto", "channels_last | contiguous | auto (channels_last on CUDA only)",
                             "auto channels_last contiguous")
    float64: bool = opt(False, "CPU only: compute in float64 (for equivalence checks)")

    @property
    def uses_exemplars(self):
        """False for plain ReSA (lambda = mu = 0): exemplars are then not even forwarded."""
        return self.lambda_proto > 0 or self.mu_mix > 0


# settings of how a run is carried out, not of what it learns: a resumed run takes them from its command line
RUN_CONTROL = ("out", "overwrite", "resume", "max_steps", "keep_every", "compile", "compile_mode", "device", "data_on",
               "memory_format")


# settings that fix which tensors a checkpoint holds and their shapes (networks, memory bank): a resumed run keeps them
FIXED_BY_CHECKPOINT = ("exemplars_per_class", "arch", "width", "proj_hidden", "proj_dim", "stem", "bank_size",
                       "select_space")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see python osessl.py --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(defaults=True):
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), f.default if defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=default, help=f.metadata["help"])
    return p


def parse_config(argv=None) -> Config:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    if cfg.resume:  # the run's own settings, except those given on this command line
        given = vars(build_parser(defaults=False).parse_args(argv))
        saved = {k: v for k, v in read_checkpoint(cfg.resume)["config"].items() if k not in RUN_CONTROL}
        for name in set(FIXED_BY_CHECKPOINT) & set(given):
            saved.setdefault(name, getattr(Config, name))  # a checkpoint from before the setting ran its default
            if given[name] != saved[name]:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{cfg.resume} has {flag} {saved[name]}, this run {flag} {given[name]}: drop {flag} "
                                 f"or set it to {saved[name]}")
        cfg = Config(**{**asdict(cfg), **saved, **given})
    check_config(cfg)
    return cfg


def check_config(cfg: Config):
    flag = lambda name: "--" + name.replace("_", "-")
    if cfg.image_size and not 8 <= cfg.image_size <= 4096:
        raise UsageError(f"--image-size must lie in 8..4096 pixels (0 = the images' own size), got {cfg.image_size}")
    for f in fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        limits = [(op, m[key], holds) for key, op, holds in LIMITS if m[key] is not None]
        if limits and not (math.isfinite(value) and all(holds(value, b) for _, b, holds in limits)):
            raise UsageError(f"{flag(f.name)} must be {' and '.join(f'{op} {b}' for op, b, _ in limits)}, got {value}")
        if m["choices"] and value not in m["choices"]:
            raise UsageError(f"unknown {flag(f.name)} {value!r}: use {', '.join(m['choices'][:-1])} or "
                             f"{m['choices'][-1]}")
    if cfg.uses_exemplars and cfg.k > cfg.bank_size:  # ReSA keeps no bank
        raise UsageError(f"--k {cfg.k} is larger than the memory bank (--bank-size {cfg.bank_size}): lower k or "
                         "enlarge the bank")


# ============ 10. Training loop: schedules, evaluation, checkpoints, logs ============
def lr_schedule(step, total_steps, warmup_steps, peak, final_ratio):
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (final_ratio + (1 - final_ratio) * (math.cos(math.pi * t) + 1) / 2)


def epoch_permutation(seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def save_checkpoint(path, obj):
    """Write to a temporary file and rename: a crash while saving never replaces a good checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


@torch.no_grad()
def extract_features(net, images, mean, std, to_net=lambda x: x, index=None, batch_size=1024):
    """float32 outputs of `net` (an encoder: the unnormalised features) for uint8 images (N, 3, H, W),
    or for images[index] read a chunk at a time (no copy of the split), in eval mode (BatchNorm running
    statistics), no augmentation. The images may live on the host (--data-on host): chunks go to the
    device of mean."""
    was_training = net.training
    net.eval()
    out = []
    chunks = images.split(batch_size) if index is None else (images[i] for i in index.split(batch_size))
    for chunk in chunks:
        x = (chunk.to(mean.device, non_blocking=True).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            out.append(net(to_net(x)).float())
    net.train(was_training)
    return torch.cat(out)


def embed(net, images, mean, std, to_net=lambda x: x):
    """z = norm(g(f(x))) of uint8 images through a Network's encoder and projector, as extract_features."""
    return F.normalize(extract_features(nn.Sequential(net.encoder, net.projector), images, mean, std, to_net), dim=1)


@torch.no_grad()
def project(net, h):
    """z = norm(g(h)) of backbone features h (N, e) through a Network's projector, eval-mode BatchNorm."""
    was_training = net.training
    net.eval()
    h = h.to(net.projector[0].weight.dtype)  # extract_features gives float32; the network may be float64
    z = F.normalize(torch.cat([net.projector(chunk) for chunk in h.split(4096)]).float(), dim=1)
    net.train(was_training)
    return z


@torch.no_grad()
def precision_by_space(net, images, labels, bank, exemplar_images, C, mean, std, k, alpha, to_net=lambda x: x):
    """Diagnostic, never a loss: the neighbour precision when the un-augmented exemplars (S per class, class
    by class, of C classes) choose (by the discriminative score of their class_anchor)
    among the images the bank holds, all embedded afresh by `net`, in backbone features h and in embeddings z
    (--select-space), whichever space the run chooses in."""
    ids = bank.ids[bank.valid()]
    if len(ids) < k:
        return {}
    h = extract_features(net.encoder, images, mean, std, to_net, index=ids.to(images.device))
    h_ex = extract_features(net.encoder, exemplar_images, mean, std, to_net)
    report, classes = {}, torch.arange(C, device=labels.device)[:, None]
    for space, (entries, ex) in {"h": (h, h_ex), "z": (project(net, h), project(net, h_ex))}.items():
        ex = class_anchor(F.normalize(ex, dim=1).unflatten(0, (C, -1)))
        nbr = discriminative_scores(F.normalize(entries, dim=1), ex, alpha).topk(k, dim=1).indices
        report[f"nbr_precision_{space}"] = (labels[ids[nbr].to(labels.device)] == classes).float().mean().item()
    return report


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k=5, cosine=False, T=0.07):
    """Top-1 (%) of k-NN classification of test features by training features (k capped at their
    number). cosine=False: ReSA's protocol, a majority vote of the k nearest by Euclidean distance
    (ties: the lowest class). cosine=True: weighted cosine k-NN (InstDisc, DINO), votes exp(cos / T)."""
    k, train_f, test_f = min(k, len(train_f)), train_f.float(), test_f.float()
    if cosine:
        train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for q, y in zip(test_f.split(1024), test_y.split(1024)):
        # cosine similarity, or -||q - t||^2 up to a constant per query: the Euclidean ranking
        sims, idx = (q @ train_f.T if cosine else 2 * q @ train_f.T - (train_f * train_f).sum(1)).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device, dtype=sims.dtype)
        votes.scatter_add_(1, train_y[idx], (sims / T).exp() if cosine else torch.ones_like(sims))
        correct += (votes.argmax(1) == y).sum()  # summed on the device, read once below
    return int(correct) / len(test_y) * 100


def knn_report(train_f, train_y, test_f, test_y, num_classes):
    """The k-NN protocols osessl reports: ReSA's 5-NN, and weighted cosine 20-NN and 200-NN."""
    knn = partial(knn_accuracy, train_f, train_y, test_f, test_y, num_classes)
    return {"knn5": knn(5), "knn20_cos": knn(20, cosine=True), "knn200_cos": knn(200, cosine=True)}


def evaluate(run, train_x, train_y, test_x, test_y, memory=None):
    """In-training k-NN on the momentum encoder's features, the training images in use as memory
    (memory: their indices; None: all).
    With exemplars, also the neighbour precision that the current bank gives to the un-augmented
    exemplars embedded by the online network (z_l, the members) and by the momentum network (which
    fills the bank and, by default, chooses the neighbours): how well the two embeddings agree; and the
    precision in h and in z of the bank's images embedded afresh (precision_by_space)."""
    feats = lambda x, index=None: extract_features(run.momentum_net.encoder, x, run.mean, run.std, run.to_net, index)
    memory_y = train_y if memory is None else train_y[memory.to(train_y.device)]
    report = knn_report(feats(train_x, memory), memory_y, feats(test_x), test_y, run.num_classes)
    if run.cfg.uses_exemplars:
        cfg = run.cfg
        for name, net in (("online", run.net), ("momentum", run.momentum_net)):
            h = extract_features(net.encoder, run.exemplar_images, run.mean, run.std, run.to_net)
            z = project(net, h).to(run.bank.feats.dtype).unflatten(0, (run.num_classes, -1))  # (C, S, d)
            # the exemplars choose in the space the run chooses in (--select-space)
            select_by = None if run.bank.select is None else \
                F.normalize(h, dim=1).to(run.bank.select.dtype).unflatten(0, (run.num_classes, -1))
            nbr = build_prototypes(z, run.bank.feats, run.bank.valid(), cfg.k, cfg.alpha, cfg.tau_w,
                                   select_by=select_by, select_feats=run.bank.select)[1]
            report[f"nbr_precision_{name}"] = neighbour_precision(nbr, run.bank, run.labels).item()
        report.update(precision_by_space(run.momentum_net, run.images, run.labels, run.bank, run.exemplar_images,
                                         run.num_classes, run.mean, run.std, cfg.k, cfg.alpha, run.to_net))
    return report


def dataset_name(dataset, data_dir):
    """cifar10, cifar100, synthetic, or the ImageFolder's folder name (data/cifar100 -> cifar100)."""
    return os.path.basename(os.path.normpath(data_dir)) if dataset == "imagefolder" else dataset


def prepare_run_dir(cfg, method):
    name = dataset_name(cfg.dataset, cfg.data_dir)
    stamp = agree(int(time.strftime("%Y%m%d%H%M%S")))  # one name for every process, whatever their clocks
    out = cfg.out or os.path.join("runs", f"{name}-{method}-{stamp // 10 ** 6}-{stamp % 10 ** 6:06d}")
    if cfg.resume:
        out = cfg.out or os.path.dirname(cfg.resume)
    elif os.path.isdir(out) and os.listdir(out) and not cfg.overwrite:
        raise UsageError(f"--out {out} already holds a run: resume it with --resume {out}/last.pt, "
                         f"choose another --out, or pass --overwrite")
    return out


def read_checkpoint(path):
    """An osessl checkpoint, loaded as tensors and plain data only (weights_only: a crafted file never
    runs code here), its settings checked as a Config; the parts are checked when loaded (load_parts)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not a checkpoint: give the checkpoint in it, such as "
                         f"{os.path.join(path, 'last.pt')}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path}: no such file") from None
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}): osessl loads tensors and plain "
                         "data only") from None
    if not isinstance(ck, dict) or type(ck.get("format")) is not int:
        raise UsageError(f"{path} is not an osessl checkpoint")
    if ck["format"] > CHECKPOINT_FORMAT:
        raise UsageError(f"{path} has format {ck['format']}, newer than this osessl.py's: update osessl.py")
    try:
        check_config(Config(**ck["config"]))
        counts = [ck["step"], ck["num_classes"], ck.get("world_size", 1), ck.get("global_batch", 1)]
        if not all(type(n) is int and n >= 0 for n in counts):
            raise ValueError(f"its step, classes, world size or global batch is not a count ({counts})")
    except (KeyError, ValueError, TypeError, UsageError) as e:
        raise UsageError(f"{path} is not a usable osessl checkpoint ({type(e).__name__}: {e})") from None
    return ck


def load_parts(path, ck, parts):
    """Strict load_state_dict of each named part (networks, optimiser, memory bank); a part that does
    not fit is one line naming it."""
    for name, part in parts.items():
        try:
            part.load_state_dict(ck[name])
            state = part.state.items() if isinstance(part, torch.optim.Optimizer) else ()  # loaded, never checked
            if any(s.get("momentum_buffer", p).shape != p.shape for p, s in state):
                raise ValueError("its momentum buffers are not of the network's parameter shapes")
        except Exception as e:
            detail = " ".join(str(e).split())
            raise UsageError(f"{path}: its {name!r} does not fit this run ({type(e).__name__}: {detail[:150]})") \
                from None


def check_resume(cfg, ck, world, rank):
    """What can be checked before any data is read: the dataset, and the global batch. A run resumes
    with the global batch it was trained with (the learning rate, the steps per epoch and the schedules
    follow it); under another number of processes that keeps it, it continues (every draw is of the
    global batch, so the run is the same up to roundoff)."""
    if ck["config"]["dataset"] != cfg.dataset:
        raise UsageError(f"{cfg.resume} was trained on {ck['config']['dataset']}, not {cfg.dataset}: pass the matching "
                         "--dataset/--data-dir")
    trained, w, b = ck.get("global_batch"), ck.get("world_size"), ck["config"]["batch_size"]
    if trained is None or trained == cfg.batch_size * world:
        if w not in (None, world) and rank == 0:
            print(f"osessl: {cfg.resume} was trained on {w} process(es) x --batch-size {b}; continuing on {world} x "
                  f"{cfg.batch_size}, the same global batch {trained}", flush=True)
        return
    hint = f", or give --batch-size {trained // world} for the same global batch" if trained % world == 0 else ""
    raise UsageError(f"{cfg.resume} was trained with a global batch of {trained} ({w} process(es) x --batch-size {b}), "
                     f"this run's is {cfg.batch_size * world} ({world} x {cfg.batch_size}): resume it on {w} "
                     f"process(es) with its --batch-size{hint}")


def load_checkpoint(cfg, train_y, num_classes, ck=None):
    """Read cfg.resume (unless already read) and refuse it if it was trained on other data."""
    ck = ck or read_checkpoint(cfg.resume)
    if ck["config"]["dataset"] != cfg.dataset or ck["num_classes"] != num_classes:
        raise UsageError(f"{cfg.resume} was trained on {ck['config']['dataset']} with {ck['num_classes']} classes, "
                         f"not {cfg.dataset} with {num_classes}: pass the matching --dataset/--data-dir")
    try:  # a ReSA run has no exemplars (before 2026-11-25 it drew them too)
        ex, ids, resa = ck["exemplars"], ck["bank"]["ids"], not Config(**ck["config"]).uses_exemplars
        classes = torch.arange(num_classes).repeat_interleave(Config(**ck["config"]).exemplars_per_class)
        fits = ex.dtype == ids.dtype == torch.long and ex.dim() == 1 \
            and (len(ex) == len(classes) or resa and not len(ex)) \
            and ((0 <= ex) & (ex < len(train_y))).all() and ((-1 <= ids) & (ids < len(train_y))).all() \
            and (not len(ex) or torch.equal(train_y[ex], classes))
    except (KeyError, TypeError, AttributeError, RuntimeError):
        fits = False
    if not fits:
        raise UsageError(f"{cfg.resume}: its exemplars and memory bank do not index images of each class of these "
                         f"{len(train_y)} training images: pass the --data-dir it was trained on")
    return ck


# The engine's side of the step: views, forwarding, gathering (objective calls them)
def gather(x):
    """Concatenate x from every process along dim 0 (no gradient)."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def augment_views(run, images, rnd):
    """Weak and strong views of this process's uint8 images (B, 3, H, W): its rows of the step's draws."""
    rows = slice(run.rank * images.shape[0], (run.rank + 1) * images.shape[0])
    local = lambda p: {k: v[rows] for k, v in p.items()}
    return (run.to_net(augment(images, local(rnd.weak), run.mean, run.std, strong=False)),
            run.to_net(augment(images, local(rnd.strong), run.mean, run.std, strong=True)))


def forward_views(net, views, xe, joint, exemplar_h=False):
    """h of the weak view views[0], z of every view, z of the exemplar views xe (None: none are forwarded)
    and, if exemplar_h, their h (else None). --exemplar-bn: the exemplars as a BatchNorm batch of their own
    (alone) or in one batch with the weak view (joint; the weak view's rows are then the first B)."""
    if xe is None:
        return (*net(*views), None, None)
    if not joint:
        h, z = net(*views, xe, every_h=exemplar_h)
        return (h[0], z[:-1], z[-1], h[-1]) if exemplar_h else (h, z[:-1], z[-1], None)
    B = views[0].shape[0]
    h, z = net(torch.cat([views[0], xe]), *views[1:])
    return h[:B], [z[0][:B], *z[1:]], z[0][B:], (h[B:] if exemplar_h else None)


def all_exemplars(run, z):
    """Each process forwards the exemplars rank, rank + W, ... (so that synchronised BatchNorm sees
    every exemplar once, whatever W); this puts the C rows together on every process, with gradient (with
    --exemplars-per-class S > 1: (C, S, .), class c's S labeled images in row c)."""
    if run.world > 1:
        full = z.new_zeros(len(run.exemplar_images), z.shape[1]).slice_scatter(z, 0, run.rank, None, run.world)
        z = differentiable_sum(full)
    return z if run.cfg.exemplars_per_class == 1 else z.unflatten(0, (run.num_classes, -1))


def network(cfg):
    return Network(cfg.width, cfg.proj_hidden, cfg.proj_dim, cfg.stem, cfg.arch)


def memory_bank(cfg, device=None):
    """The run's MemoryBank; with --select-space encoding it also keeps the backbone features h."""
    h_dim = 8 * cfg.width * resnet_blocks(cfg.arch)[0].expansion
    return MemoryBank(cfg.bank_size, cfg.proj_dim, device, h_dim if cfg.select_space == "encoding" else 0)


def memory_format(cfg, device):
    """--memory-format: channels_last on CUDA; on the CPU only when asked (why: README's flags table)."""
    last = cfg.memory_format == "channels_last" or cfg.memory_format == "auto" and device.type == "cuda"
    return torch.channels_last if last else torch.contiguous_format


def build_run(cfg, rank, world, device, train_x, train_y, ex_idx, num_classes):
    """Networks, optimiser, memory bank and the per-run constants that training_step reads (images, labels:
    the training split the bank's ids point into, for diagnostics)."""
    cuda = device.type == "cuda"
    mean, std = (t.to(device) for t in channel_stats(train_x))
    net, momentum = network(cfg), network(cfg)
    momentum.load_state_dict(net.state_dict())
    momentum.requires_grad_(False)
    if world > 1:
        net, momentum = sync_batchnorm(net, device), sync_batchnorm(momentum, device)
    fmt = memory_format(cfg, device)
    net, momentum = net.to(device, memory_format=fmt), momentum.to(device, memory_format=fmt)
    online = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    # --compile: augmentation and the whole objective become compiled graphs (fused elementwise
    # kernels, fewer launches); backward, the fused SGD step and the EMA stay eager.
    compiled = (lambda f: torch.compile(f, mode=cfg.compile_mode)) if cfg.compile else (lambda f: f)
    peak_lr = cfg.lr * cfg.batch_size * world / 256  # linear scaling with the global batch
    opt = torch.optim.SGD(net.parameters(), lr=peak_lr, momentum=0.9, weight_decay=cfg.weight_decay,
                          **({"fused": True} if cuda else {}))
    loss_settings = {n: getattr(cfg, n) for n in ("lambda_proto", "mu_mix", "k", "alpha", "tau_w", "tau_s", "tau_t",
                                                  "resa_temp", "sinkhorn_eps", "sinkhorn_iters", "dispersion")}
    return SimpleNamespace(cfg=cfg, rank=rank, world=world, net=net, online=online, momentum_net=momentum,
                           loss_settings=loss_settings, all_reduce=dist.all_reduce if world > 1 else None,
                           objective=compiled(objective), augment=compiled(augment_views),
                           opt=opt, peak_lr=peak_lr, bank=memory_bank(cfg, device), mean=mean,
                           std=std, num_classes=num_classes, images=train_x, labels=train_y.to(device),
                           exemplar_images=train_x[ex_idx].to(device),
                           to_net=lambda x: x.contiguous(memory_format=fmt),
                           autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda))


def train(cfg, rank=0, world=1, device=None, node=(0, 1)):
    """node: (local rank, processes on this node), so that each node decodes an ImageFolder once."""
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    Bg, ck = cfg.batch_size * world, read_checkpoint(cfg.resume) if cfg.resume else None
    if ck is not None:  # checked before any data is decoded or written
        check_resume(cfg, ck, world, rank)
    check = partial(load_checkpoint, cfg, ck=ck) if ck is not None else None
    train_x, train_y, test_x, test_y, num_classes = load_data(cfg, check, node)
    cfg = settle(cfg, train_x.shape[-1])
    no_exemplars = torch.zeros(0, dtype=torch.long)  # ReSA (lambda = mu = 0) trains on every image, as ReSA does
    ex_idx = ck["exemplars"] if ck is not None else \
        select_exemplars(cfg, train_y, num_classes) if cfg.uses_exemplars else no_exemplars
    u_idx = unlabeled_indices(cfg, len(train_x), ex_idx)
    if Bg > len(u_idx):
        raise UsageError(f"global batch {Bg} (--batch-size {cfg.batch_size} x {world} processes) is larger than the "
                         f"{len(u_idx)} unlabeled training images: lower --batch-size")
    if cfg.uses_exemplars and Bg > cfg.bank_size:  # ReSA keeps no bank
        raise UsageError(f"global batch {Bg} exceeds --bank-size {cfg.bank_size}: enlarge the bank or lower "
                         "--batch-size")
    if cfg.uses_exemplars and num_classes < 2:
        raise UsageError("the dataset has fewer than 2 classes: the discriminative score needs at least 2")
    if cfg.uses_exemplars and len(ex_idx) < world:
        raise UsageError(f"{len(ex_idx)} exemplars for {world} processes: each process forwards a share of the "
                         f"exemplars, so use at most {len(ex_idx)} processes")
    method = "osessl" if cfg.uses_exemplars else "resa"
    out = prepare_run_dir(cfg, method)
    cfg = replace(cfg, out=out)  # config.json and checkpoints record the folder used

    # Images live on the device when they fit (--data-on), else in host memory, each step's batch then
    # pinned and copied over; the only label tensor the step sees feeds a logged diagnostic.
    nbytes = train_x.numel() + test_x.numel()  # auto: in at most half the free device memory (the rest: networks)
    on_device = cfg.data_on == "device" or cfg.data_on == "auto" and nbytes <= device_free_bytes(device) / 2
    store = device if on_device else torch.device("cpu")
    train_x, test_x = train_x.to(store), test_x.to(store)  # (pinning the split would copy it: a batch is pinned)
    run = build_run(cfg, rank, world, device, train_x, train_y, ex_idx, num_classes)
    state = dict(net=run.net, momentum=run.momentum_net, opt=run.opt, bank=run.bank)  # what a checkpoint holds
    steps_per_epoch = len(u_idx) // Bg
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    lr_at = lambda s: lr_schedule(s, total, warmup, run.peak_lr, cfg.final_lr_ratio)
    m_at = lambda s: ema_schedule(s, total, cfg.ema_start)
    step, sums = 0, {}
    if ck is not None:  # nothing is written before the checkpoint is accepted
        load_parts(cfg.resume, ck, state)
        for group in run.opt.param_groups:  # this run's settings (fused SGD on CUDA only, --weight-decay)
            group.update({k: run.opt.defaults[k] for k in ("fused", "foreach", "weight_decay")})
        for p, s in run.opt.state.items():  # momentum in this run's parameter layout (--memory-format)
            if s.get("momentum_buffer") is not None:
                s["momentum_buffer"] = torch.empty_like(p).copy_(s["momentum_buffer"])
        try:
            torch.set_rng_state(ck["rng"])
            step, sums = ck["step"], {k: v.to(device) for k, v in ck.get("sums", {}).items()}
        except (KeyError, RuntimeError, TypeError, AttributeError) as e:
            raise UsageError(f"{cfg.resume}: its random generator state or loss sums are not osessl's "
                             f"({type(e).__name__})") from None
        if step >= total:
            if rank == 0:
                print(f"osessl: {cfg.resume} has finished its {step // steps_per_epoch} epochs (step {step}): nothing "
                      "to train; give --epochs N to extend it", flush=True)
            return out
        if ck["config"]["epochs"] != cfg.epochs and rank == 0:
            print(f"osessl: extending {ck['config']['epochs']} to {cfg.epochs} epochs: the lr and EMA schedules are "
                  f"recomputed for {cfg.epochs} (the steps so far followed {ck['config']['epochs']}'s)", flush=True)

    def checkpoint():
        # stopped mid-epoch: the partial sums averaged over the processes, so that any W resumes them
        saved = dict(zip(sums, process_mean(torch.stack(list(sums.values())), world))) if sums else sums
        if rank == 0:
            epoch, ends_epoch = step // steps_per_epoch, step % steps_per_epoch == 0
            ck = dict(format=CHECKPOINT_FORMAT, config=asdict(cfg), num_classes=num_classes, step=step, epoch=epoch,
                      world_size=world, global_batch=Bg, exemplars=ex_idx, sums=saved, rng=torch.get_rng_state(),
                      **{name: part.state_dict() for name, part in state.items()})
            save_checkpoint(os.path.join(out, "last.pt"), ck)
            if cfg.keep_every and ends_epoch and epoch % cfg.keep_every == 0:
                save_checkpoint(os.path.join(out, f"epoch{epoch}.pt"), ck)

    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dict(asdict(cfg), world_size=world, num_classes=num_classes, exemplar_indices=ex_idx.tolist()),
                      f, indent=1)
        where = "the device" if on_device else "the host"
        print(f"osessl: {method} on {cfg.dataset} ({len(u_idx)} unlabeled + {len(ex_idx)} exemplars, "
              f"{len(test_x)} test) | {world} process(es) on {device.type}, global batch {Bg}, {steps_per_epoch} "
              f"steps/epoch | run dir {out}\n  images: {tuple(train_x.shape[1:])} uint8, {nbytes / 2 ** 30:.2f} GiB "
              f"on {where} (--data-on {cfg.data_on}); stem {cfg.stem}, blur {cfg.blur}", flush=True)
    # k-NN memory: the training images in use, read in place (a copy of the split would break --data-on's budget)
    in_use = torch.cat([u_idx, ex_idx]).unique()
    memory = None if len(in_use) == len(train_x) else in_use.to(store)
    train_y, test_y, u_store = train_y.to(device), test_y.to(device), u_idx.to(store)
    to_device = lambda t: (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)
    last, size = min(cfg.max_steps or total, total), train_x.shape[-1]
    with Preemption() as stop:
        t_epoch, t_print, seen, first_bad, perm = time.time(), time.time(), 0, None, None
        while step < last:
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0 or perm is None:
                perm = u_store[epoch_permutation(cfg.seed, epoch, len(u_idx)).to(store)]
            ids = perm[i * Bg:(i + 1) * Bg]
            images = train_x[ids[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]]
            if not on_device:  # --data-on host: this step's images and ids to the device, without waiting
                images, ids = (to_device(t) for t in (images, ids))
            # exemplar views drawn for C x S exemplars even by ReSA, which has none: one random stream for both
            rnd = step_randomness(cfg.seed, step, Bg, num_classes * cfg.exemplars_per_class, cfg.zeta, device, size,
                                  cfg.blur == "on")
            losses = training_step(run, *run.augment(run, images, rnd), ids, rnd, lr_at(step), m_at(step))
            # first step at which each term went non-finite, kept on the device (checked once per epoch)
            finite = torch.stack([v.isfinite() for v in losses.values()])
            first_bad = torch.full_like(finite, NEVER, dtype=torch.long) if first_bad is None else first_bad
            first_bad = torch.where(finite, first_bad, first_bad.clamp(max=step))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v
            step, seen = step + 1, seen + Bg
            if rank == 0 and time.time() - t_print > 30 and step % steps_per_epoch:
                t_print = time.time()
                rate = seen / (time.time() - t_epoch)
                print(f"  epoch {epoch + 1} step {i + 1}/{steps_per_epoch} | {rate:.0f} img/s", flush=True)
            interrupted = stop.requested(step, world)
            if step % steps_per_epoch and step != last and not interrupted:
                continue
            check_finite(first_bad, list(losses), out)  # before saving: the last good checkpoint stays
            if step % steps_per_epoch == 0:  # a metrics row per completed epoch
                seconds = time.time() - t_epoch
                row = dict(epoch=epoch + 1, step=step, **epoch_means(sums, steps_per_epoch, world), lr=lr_at(step - 1),
                           momentum=m_at(step - 1), seconds=round(seconds, 2), images_per_s=round(seen / seconds, 1))
                # a stopping run skips a due evaluation (torchrun kills 30 s after SIGTERM), but not the last one
                due = step == total or not interrupted and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0
                if rank == 0 and due:
                    row.update(evaluate(run, train_x, train_y, test_x, test_y, memory))
                sums = {}
                if rank == 0:
                    log_epoch(out, row, cfg.epochs)
            checkpoint()
            if world > 1:
                dist.barrier()
            if interrupted:
                raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at step {step}; checkpoint saved: "
                                  f"resume with the same command plus --resume {os.path.join(out, 'last.pt')}",
                                  128 + stop.signum)
            t_epoch, seen = time.time(), 0
    return out


def epoch_means(sums, n, world):
    """Epoch means of the loss terms over every process: one reduction and one host copy per epoch."""
    names = list(sums)
    v = process_mean(torch.stack([sums[k] for k in names]).float() / n, world)
    return {k: round(x, 6) for k, x in zip(names, v.tolist())}


def process_mean(v, world):
    """The mean of v over every process (one all-reduce), or v itself in one."""
    if world > 1:
        dist.all_reduce(v)
        v = v / world
    return v


def log_epoch(out, row, epochs):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    names = ("loss", "resa", "align", "disp", "mix_proto", "mix_ins", "nbr_precision")
    terms = " ".join(f"{k} {row[k]:.4f}" for k in names if k in row)
    knn = " ".join(f"{k} {v:.2f}%" for k, v in row.items() if k.startswith("knn"))
    print(f"epoch {row['epoch']}/{epochs} | {terms} | lr {row['lr']:.4f} m {row['momentum']:.5f} | "
          f"{row['seconds']:.1f}s {row['images_per_s']:.0f} img/s {knn}".rstrip(), flush=True)


class Interrupted(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


NEVER = torch.iinfo(torch.long).max  # first_bad's "no non-finite step yet"


def check_finite(first_bad, names, out):
    """Stop (exit 3) at the first non-finite loss term of any process: the steps are agreed over the
    processes (one all-reduce), so that all stop here together instead of waiting for each other."""
    if dist.is_initialized():
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    hits = [(s, n) for s, n in zip(first_bad.tolist(), names) if s < NEVER]
    if hits:
        s = min(s for s, _ in hits)
        terms = ", ".join(n for t, n in hits if t == s)
        raise Interrupted(f"non-finite loss at step {s} ({terms}); stopped without saving, the last good checkpoint "
                          f"{os.path.join(out, 'last.pt')} is intact: lower --lr or check the data", 3)


def agree(value):
    """The largest of an integer over every process (one tiny all-reduce), or the integer itself in one."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


class Preemption:
    """SIGTERM or Ctrl-C sets a flag; the loop then saves a checkpoint and exits. Under DDP the
    flag is agreed on every 10 steps (one tiny all-reduce), so all processes stop at the same step."""
    signum = 0

    def __enter__(self):
        handler = lambda signum, frame: setattr(self, "signum", signum)
        self.previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, step, world):
        if world > 1 and step % 10 == 0:
            self.signum = agree(self.signum)
        return self.signum != 0 and (world == 1 or step % 10 == 0)


# ============ 11. Entry point: one process, or one per GPU under torchrun (nanoGPT style) ============
def cuda_settings():
    """cuDNN picks the fastest convolutions (they run in bf16 under autocast). float32 matrix products
    stay true float32, not TF32: Sinkhorn's similarities and the temperature softmaxes (exp(s / 0.05),
    exp(s / 0.04)) would magnify TF32's 10-bit mantissa error into their targets."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("highest")


def main(argv=None):
    try:
        cfg = parse_config(argv)
        ddp = "RANK" in os.environ
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA device is visible: drop --device or use --device cpu")
        use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
        if cfg.float64:
            if use_cuda:
                raise UsageError("--float64 is for CPU checks: add --device cpu")
            torch.set_default_dtype(torch.float64)
        rank, world, node = 0, 1, (0, 1)
        if ddp:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            if use_cuda:
                torch.cuda.set_device(node[0])
            # a first decode of a large ImageFolder waits in a collective longer than NCCL's 10-minute default
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu")
        if use_cuda:
            cuda_settings()
        train(cfg, rank, world, device, node)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"osessl: {e}", file=sys.stderr)
        if dist.is_initialized():  # every process stops here (agreed): leave together, none mid-teardown
            dist.barrier()
        sys.exit(e.code)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's refusal of an impossible size
        if "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:120]}): lower --batch-size, --width, --proj-hidden, "
              "--bank-size or the data's size", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
