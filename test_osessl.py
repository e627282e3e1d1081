"""Tests for osessl: each states the paper's claim (METHOD.md) it checks. CPU only, synthetic data.

Run: python -m pytest -q test_osessl.py
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import knn_eval
import osessl as O

HERE = os.path.dirname(os.path.abspath(__file__))
# A small network keeps the CPU suite fast; test_resnet18_matches_torchvision runs the real one.
TINY = ["--dataset", "synthetic", "--width", "8", "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "32",
        "--bank-size", "128", "--k", "4", "--epochs", "2", "--synthetic-per-class", "32", "--eval-every", "1"]


def tiny_config(tmp_path, *extra):
    return O.parse_config(TINY + ["--out", str(tmp_path / "run")] + list(extra))


def run_cli(*args, script="osessl.py", cwd=HERE, launcher=()):
    return subprocess.run([sys.executable, *launcher, os.path.join(HERE, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ---------------- gradient checks, float64, for every loss term ----------------
def test_gradcheck_resa_loss():
    z1, z2 = unit(6, 5, seed=1).requires_grad_(), unit(6, 5, seed=2).requires_grad_()
    k1, k2 = unit(6, 5, seed=3), unit(6, 5, seed=4)
    A = O.sinkhorn(z1.detach() @ k1.T, 0.5, 3)
    assert torch.autograd.gradcheck(lambda a, b: O.resa_loss(a, b, k1, k2, A, 0.4), (z1, z2))


def test_gradcheck_sinkhorn():
    s = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: O.sinkhorn(x, 0.5, 3), (s,))


def proto_inputs(C=4, K=12, d=6):
    bank = unit(K, d, seed=10)
    return unit(C, d, seed=11).requires_grad_(), bank, torch.ones(K, dtype=torch.bool)


def test_gradcheck_build_prototypes():
    zl, bank, valid = proto_inputs()
    assert torch.autograd.gradcheck(lambda e: O.build_prototypes(e, bank, valid, 3, 0.75, 0.5)[0], (zl,))
    assert torch.autograd.gradcheck(lambda e: O.build_prototypes(e, bank, valid, 3, 0.75, 0.5)[2], (zl,))


def test_gradcheck_align_loss_reaches_exemplars():
    zl, bank, valid = proto_inputs()
    z1, z2 = unit(5, 6, seed=12).requires_grad_(), unit(5, 6, seed=13).requires_grad_()
    t1, t2 = O.assign(unit(5, 6, seed=14), zl.detach(), 0.04), O.assign(unit(5, 6, seed=15), zl.detach(), 0.04)

    def f(e, a, b):
        return O.align_loss(a, b, O.build_prototypes(e, bank, valid, 3, 0.75, 1.0)[0], t1, t2, 0.1)
    assert torch.autograd.gradcheck(f, (zl, z1, z2))
    f(zl, z1, z2).backward()
    assert zl.grad.abs().sum() > 0  # the exemplars are trained through their prototypes


@pytest.mark.parametrize("mode", ["mean", "logsumexp"])
def test_gradcheck_dispersion_loss(mode):
    zl, bank, valid = proto_inputs()
    f = lambda e: O.dispersion_loss(O.build_prototypes(e, bank, valid, 3, 0.75, 1.0)[0], 0.1, mode)
    assert torch.autograd.gradcheck(f, (zl,))


def test_gradcheck_mix_losses():
    zm = unit(5, 6, seed=20).requires_grad_()
    protos = unit(4, 6, seed=21).requires_grad_()
    beta = torch.rand(5, dtype=torch.float64)
    partner = torch.randperm(5)
    t1, t2 = O.assign(unit(5, 6, seed=22), protos.detach(), 0.04), O.assign(unit(5, 6, seed=23), protos.detach(), 0.04)
    target = O.interpolation_targets(beta, t1, t2[partner])
    assert torch.autograd.gradcheck(lambda z, c: O.mix_proto_loss(z, c, target, 0.1), (zm, protos))
    keys = unit(10, 6, seed=24).requires_grad_()
    tgt = O.instance_mix_target(beta, torch.arange(5), partner, 5).double()
    assert torch.autograd.gradcheck(lambda z, k: O.mix_instance_loss(z, k, tgt, 0.4), (zm, keys))


# ---------------- the paper's claims ----------------
def test_alignment_gradient_pulls_z_towards_target_centroid():
    """grad_z CE(p', z @ c^T / tau_s) = (E_p[c] - E_p'[c]) / tau_s for unnormalised z and fixed p'.
    align_loss averages the two directions, so its z1-gradient is half of that."""
    tau = 0.1
    z1 = torch.randn(1, 6, dtype=torch.float64, requires_grad=True) * 1
    z1.retain_grad()
    c = unit(4, 6, seed=30)
    target = torch.tensor([[0.1, 0.6, 0.2, 0.1]], dtype=torch.float64)
    O.align_loss(z1, unit(1, 6, seed=31), c, target, target, tau).backward()
    p = (z1.detach() @ c.T / tau).softmax(-1)
    expected = (p @ c - target @ c) / tau / 2
    assert torch.allclose(z1.grad, expected, atol=1e-12)
    # a gradient step moves z towards the target's centroid: its assignment gets closer to p'
    z_new = z1.detach() - 0.01 * z1.grad
    kl = lambda z: F.kl_div((z @ c.T / tau).log_softmax(-1), target, reduction="sum")
    assert kl(z_new) < kl(z1.detach())


def test_sinkhorn_rows_sum_to_one_and_columns_equalise():
    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    cols = F.normalize(torch.randn(64, 16, generator=g) + torch.randn(1, 16, generator=g), dim=1)  # some columns popular
    scores = rows @ cols.T
    few = O.sinkhorn(scores, 0.05, 3)
    many = O.sinkhorn(scores, 0.05, 500)
    raw = torch.exp((scores - scores.max()) / 0.05)
    raw = raw / raw.sum(1, keepdim=True)
    for A in (few, many):
        assert torch.allclose(A.sum(1), torch.ones(64), atol=1e-5)
    assert torch.allclose(many.sum(0), torch.ones(64), atol=1e-3)      # equal column mass in the limit
    assert few.sum(0).std() < raw.sum(0).std()                         # 3 iterations already equalise


def hand_built_bank():
    """Exemplar 0 = e_x, exemplar 1 between e_x and e_y. Entry b is similar to exemplar 0 (0.80) but even
    more to exemplar 1 (0.96); entry c2 is less similar to exemplar 0 (0.70) and far from exemplar 1."""
    ex = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0]])
    a = F.normalize(torch.tensor([0.95, 0, 0.312]), dim=0)
    b = torch.tensor([0.8, 0.6, 0])
    c2 = F.normalize(torch.tensor([0.7, -0.714, 0]), dim=0)
    far = torch.tensor([0.0, 0, -1])
    return ex, torch.stack([a, b, c2, far])


def test_neighbour_close_to_another_exemplar_is_rejected():
    ex, bank = hand_built_bank()
    valid = torch.ones(4, dtype=torch.bool)
    plain = (ex @ bank.T)[0].topk(2).indices.tolist()
    assert sorted(plain) == [0, 1]                                     # plain similarity takes b
    _, idx, w = O.build_prototypes(ex, bank, valid, k=2, alpha=0.75, tau_w=1.0)
    assert sorted(idx[0].tolist()) == [0, 2]                           # the discriminative score takes c2 instead
    assert 1 not in idx[0].tolist()
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert (w[:, 0] >= w[:, 1:].max(1).values).all()                  # the exemplar itself weighs the most


def test_memory_bank_fifo_and_only_filled_slots():
    bank = O.MemoryBank(5, 3, torch.device("cpu"))
    bank.enqueue(torch.ones(3, 3), torch.tensor([0, 1, 2]))
    assert bank.valid().tolist() == [True, True, True, False, False]
    bank.enqueue(2 * torch.ones(3, 3), torch.tensor([3, 4, 5]))
    assert bank.ids.tolist() == [5, 1, 2, 3, 4]                          # oldest overwritten first, wrapped
    assert bank.valid().all() and int(bank.ptr) == 1
    # unfilled slots are never selected, even when they would score highest
    ex, entries = hand_built_bank()
    feats = torch.cat([entries[:2], ex[:1].repeat(3, 1)])                # slots 2-4 hold copies of exemplar 0
    valid = torch.tensor([True, True, False, False, False])
    _, idx, w = O.build_prototypes(ex, feats, valid, k=3, alpha=0.75)
    assert all(int(i) < 2 or float(wt) == 0 for row_i, row_w in zip(idx, w[:, 1:]) for i, wt in zip(row_i, row_w))
    assert torch.allclose(w.sum(1), torch.ones(2))


def test_mixup_targets_are_the_stated_convex_combinations():
    beta = torch.tensor([0.3, 0.9, 0.5])
    p1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.5, 0.5, 0]])
    p2 = torch.tensor([[0, 0, 1.0], [0, 0.5, 0.5], [1, 0, 0]])
    partner = torch.tensor([2, 0, 1])
    t = O.interpolation_targets(beta, p1, p2[partner])
    assert torch.allclose(t[0], 0.3 * p1[0] + 0.7 * p2[2])
    assert torch.allclose(t.sum(1), torch.ones(3))
    # instance level, 2 processes of 3 rows, this is rank 1 (global rows 3..5) of B_g = 6
    own, gpartner = torch.tensor([3, 4, 5]), torch.tensor([0, 5, 2])
    T = O.instance_mix_target(beta, own, gpartner, 6)
    assert T.shape == (3, 12)
    assert T[0, 3] == pytest.approx(0.3) and T[0, 6 + 0] == pytest.approx(0.7)
    assert T[1, 4] == pytest.approx(0.9) and T[1, 6 + 5] == pytest.approx(0.1)
    assert torch.allclose(T.sum(1), torch.ones(3))


def test_beta_sampler_matches_beta_moments():
    """Beta(zeta, zeta) has mean 1/2 and variance 1 / (4 (2 zeta + 1)), down to a small zeta such as 0.01,
    where almost every draw is near 0 or 1 (drawn directly, the Gamma variates were clamped at the smallest
    float: 18% came out exactly 0.5 in float32 at 0.01, a quarter in float64 at 0.001)."""
    for zeta in (0.001, 0.01, 0.4, 1.0, 2.0):
        b = O.sample_beta(200_000, zeta, O.step_generator(0, 0, torch.device("cpu")))
        assert 0 <= b.min() and b.max() <= 1 and b.dtype == torch.float32
        assert b.mean() == pytest.approx(0.5, abs=0.01)
        assert b.var() == pytest.approx(1 / (4 * (2 * zeta + 1)), rel=0.03)
        assert (b == 0.5).float().mean() < 1e-3


def test_dispersion_modes():
    """mean (the paper's text): every pair is pushed apart with the same weight; logsumexp: the
    closest pair the hardest. The gradient on prototype i is sum_j W_ij c^j; we read W off it."""
    c = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0.9, 0.43, 0, 0], [0, 0, 1.0, 0.2], [0, 1.0, 0, 0.5]],
                                 dtype=torch.float64), dim=1).requires_grad_()
    for mode in ("mean", "logsumexp"):
        (g,) = torch.autograd.grad(O.dispersion_loss(c, 0.1, mode), c)
        W = g @ torch.linalg.inv(c.detach())                     # g = W c
        off = W[~torch.eye(4, dtype=torch.bool)]
        if mode == "mean":
            assert torch.allclose(off, off[0].expand_as(off))
        else:
            assert W[0, 1] > 5 * W[0, 2] and W[0, 1] > 5 * W[0, 3]  # 0 and 1 are the closest pair
    sim = c.detach() @ c.detach().T
    assert O.dispersion_loss(c, 0.1, "mean").item() == pytest.approx((sim.sum() - 4).item() / 12 / 0.1)


# ---------------- augmentation ----------------
def test_augmentation_shapes_ranges_randomness_and_reproducibility():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(16, 1, 1, 1)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    p = O.step_randomness(0, 7, 16, 2, 1.0, torch.device("cpu"))
    for strong, params in ((False, p.weak), (True, p.strong)):
        v = O.augment(x, params, mean, std, strong)
        assert v.shape == (16, 3, 32, 32) and v.dtype == torch.float32
        lo, hi = (0 - mean) / std, (1 - mean) / std
        assert (v >= lo.view(1, 3, 1, 1) - 1e-5).all() and (v <= hi.view(1, 3, 1, 1) + 1e-5).all()
        assert not torch.allclose(v[0], v[1])                          # same image, its own crop per sample
    again = O.step_randomness(0, 7, 16, 2, 1.0, torch.device("cpu"))
    assert torch.equal(O.augment(x, again.strong, mean, std, True), O.augment(x, p.strong, mean, std, True))
    other = O.step_randomness(0, 8, 16, 2, 1.0, torch.device("cpu"))
    assert not torch.equal(O.augment(x, other.strong, mean, std, True), O.augment(x, p.strong, mean, std, True))


def test_crop_boxes_fit_the_image_size():
    for size in (16, 32, 64):
        p = O.sample_view_params(2000, O.step_generator(0, 0, torch.device("cpu")), size)
        top, left, h, w = p["box"].unbind(1)
        assert (h >= 1).all() and (top >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
        scale = h * w / size ** 2
        assert scale.min() > 0.15 and scale.max() > 0.9  # scale (0.2, 1), up to rounding of the box sides


def test_full_box_without_flip_is_identity():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    p = dict(box=torch.tensor([[0.0, 0, 32, 32]] * 2), flip=torch.tensor([False, True]))
    v = O.augment(x, p, torch.zeros(3), torch.ones(3), strong=False)
    assert torch.allclose(v[0], x[0].float() / 255, atol=1e-5)
    assert torch.allclose(v[1], x[1].float().flip(-1) / 255, atol=1e-5)


def test_strong_view_resamples_bicubically_weak_view_bilinearly():
    """As ReSA's official code: the strong view's RandomResizedCrop is bicubic, the weak view's bilinear.
    A crop of the top-left 16 x 16 to 32 x 32 (colour operations off) equals torchvision's resized_crop
    with that interpolation on every pixel whose cubic support lies inside the crop."""
    from torchvision.transforms.functional import InterpolationMode, resized_crop
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    off = torch.zeros(2, dtype=torch.bool)
    p = dict(box=torch.tensor([[0.0, 0, 16, 16]] * 2), flip=off, jitter=off, gray=off, solarize=off,
             factors=torch.ones(2, 4), order=torch.arange(4).repeat(2, 1))
    inner = (..., slice(4, 28), slice(4, 28))
    for strong, mode in ((True, InterpolationMode.BICUBIC), (False, InterpolationMode.BILINEAR)):
        ours = O.augment(x, p, torch.zeros(3), torch.ones(3), strong)
        ref = resized_crop(x.float() / 255, 0, 0, 16, 16, [32, 32], mode, antialias=False).clamp(0, 1)
        assert torch.allclose(ours[inner], ref[inner], atol=1e-5), mode
    bicubic = resized_crop(x.float() / 255, 0, 0, 16, 16, [32, 32], InterpolationMode.BICUBIC, antialias=False)
    assert not torch.allclose(ours[inner], bicubic[inner], atol=1e-3)  # the weak view is not bicubic


def test_hue_shift_matches_torchvision():
    from torchvision.transforms.functional import adjust_hue
    x = torch.rand(4, 3, 8, 8)
    shifts = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    ours = O._shift_hue(x, shifts)
    ref = torch.stack([adjust_hue(x[i], float(shifts[i])) for i in range(4)])
    assert torch.allclose(ours, ref, atol=1e-4)


# ---------------- networks ----------------
def test_resnet18_matches_torchvision():
    """Our ResNet-18 is torchvision's resnet18 with the CIFAR stem: same state dict, same outputs."""
    import torchvision
    ref = torchvision.models.resnet18()
    ref.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool, ref.fc = torch.nn.Identity(), torch.nn.Identity()
    ours = O.ResNet(64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == 11_168_832


def test_padded_stem_is_resas_official_cifar_encoder():
    """--stem cifar-pad: the input zero-padded by 1 px before the CIFAR stem, as ReSA's official CIFAR
    ResNet; its feature maps are 34/17/9/5 at 32 px, it equals the standard encoder applied to the
    padded image, and the state dicts interchange (the pad has no parameters)."""
    plain, padded = O.ResNet(8, "cifar"), O.ResNet(8, "cifar-pad")
    padded.load_state_dict(plain.state_dict())
    sizes = []
    for i in range(1, 5):
        getattr(padded, f"layer{i}").register_forward_hook(lambda m, inp, out: sizes.append(out.shape[-1]))
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), padded.eval()
    with torch.no_grad():
        out = padded(x)
        assert out.shape == (2, 64) and sizes == [34, 17, 9, 5]
        assert torch.allclose(out, plain(F.pad(x, (1, 1, 1, 1))), atol=1e-6)
        assert not torch.allclose(out, plain(x), atol=1e-3)


def test_cuda_settings_keep_float32_matmuls_true_float32():
    """On a GPU Sinkhorn's similarities and the temperature softmaxes are computed in true float32:
    cuda_settings (called by main on CUDA) sets no TF32 for matrix products (it only sets flags, so
    this runs on the CPU; the GPU smoke run also compares Sinkhorn on CUDA with float64)."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # as if something had enabled TF32 before
        O.cuda_settings()
        assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.benchmark = False


# ---------------- training ----------------
def params_of(run_dir):
    ck = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    return ck["net"], ck["momentum"]


def test_lambda_mu_zero_is_exactly_resa(tmp_path):
    """With lambda = mu = 0 the step is plain ReSA, on every training image (ReSA has no exemplars):
    compare with a ReSA reference written here."""
    cfg = tiny_config(tmp_path, "--lambda-proto", "0", "--mu-mix", "0", "--max-steps", "3", "--eval-every", "0")
    out = O.train(cfg)
    torch.manual_seed(cfg.seed)
    tx, ty, _, _, C = O.load_data(cfg)
    u = torch.arange(len(tx))  # every training image, none drawn as an exemplar
    mean, std = O.channel_stats(tx)
    net, mom = O.Network(8, 64, 32), O.Network(8, 64, 32)
    mom.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.3 * 32 / 256, momentum=0.9, weight_decay=1e-4)
    spe = len(u) // 32
    for step in range(3):
        ids = u[O.epoch_permutation(cfg.seed, 0, len(u))][step * 32:(step + 1) * 32]
        r = O.step_randomness(cfg.seed, step, 32, C, 1.0, torch.device("cpu"))
        x1, x2 = O.augment(tx[ids], r.weak, mean, std, False), O.augment(tx[ids], r.strong, mean, std, True)
        with torch.no_grad():
            hm, (k1, k2) = mom(x1, x2)
        h, (z1, z2) = net(x1, x2)
        A = O.sinkhorn(F.normalize(h.detach(), dim=-1) @ F.normalize(hm, dim=-1).T, 0.05, 3)
        loss = O.resa_loss(z1, z2, k1, k2, A, 0.4)
        for g in opt.param_groups:
            g["lr"] = O.lr_schedule(step, 2 * spe, 2 * spe, 0.3 * 32 / 256, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        O.ema_update(mom, net, O.ema_schedule(step, 2 * spe, 0.996))
    trained, trained_m = params_of(out)
    for k, v in net.state_dict().items():
        assert torch.equal(trained[k], v), k
    for k, v in mom.state_dict().items():
        assert torch.equal(trained_m[k], v), k


def test_resa_mode_trains_on_the_whole_training_split(tmp_path, capsys):
    """ReSA mode draws, removes and forwards no exemplar: 320 training images give 10 steps of 32 per
    epoch (OSESSL: 310 unlabeled, 9 steps); knn_eval's one-shot exemplar row draws exemplars for
    evaluation only, and without a memory bank it reports no prototype row."""
    for flags, images, steps, exemplars in ((("--lambda-proto", "0", "--mu-mix", "0"), 320, 10, 0), ((), 310, 9, 10)):
        out = O.train(tiny_config(tmp_path / str(images), "--epochs", "1", "--eval-every", "0", *flags))
        assert f"{images} unlabeled + {exemplars} exemplars" in capsys.readouterr().out
        assert json.loads(open(os.path.join(out, "metrics.jsonl")).readline())["step"] == steps
        assert len(json.load(open(os.path.join(out, "config.json")))["exemplar_indices"]) == exemplars
    res = knn_eval.main(["--checkpoint", str(tmp_path / "320" / "run" / "last.pt")])
    assert 0 <= res["oneshot_exemplar"] <= 100
    assert "oneshot_prototype" not in res  # ReSA fills no memory bank: no prototype to classify with
    ev = tmp_path / "320" / "run" / "eval.json"  # as knn_eval wrote it before: the exemplar row twice
    ev.write_text(json.dumps(dict(json.loads(ev.read_text()), oneshot_prototype=res["oneshot_exemplar"])))
    assert "oneshot_prototype" not in knn_eval.summarize([str(ev.parent)])[0]["final"]


# the default (momentum, joint: README's CPU study) and the other three settings of --exemplar-select / --exemplar-bn
EXEMPLAR_FORWARD = [(), *[("--exemplar-select", s, "--exemplar-bn", b)
                          for s, b in (("online", "alone"), ("momentum", "alone"), ("online", "joint"))],
                    ("--select-space", "encoding", "--exemplar-select", "online", "--exemplar-bn", "alone"),
                    ("--select-space", "encoding", "--exemplars-per-class", "3")]
EXEMPLAR_IDS = ["default", "online-alone", "momentum-alone", "online-joint", "encoding-online-alone",
                "encoding-3-per-class"]


@pytest.mark.parametrize("setting", EXEMPLAR_FORWARD, ids=EXEMPLAR_IDS)
def test_label_isolation(tmp_path, monkeypatch, setting):
    """Training reads no label but the C x S exemplars': permuting all other labels changes nothing."""
    real = O.make_synthetic
    n = 10 * (int(setting[setting.index("--exemplars-per-class") + 1]) if "--exemplars-per-class" in setting else 1)
    ex = json.dumps(list(range(n)))  # synthetic labels are i % 10, so images 0..n-1 are n / 10 of each class
    (tmp_path / "ex.json").write_text(ex)
    cfg = lambda name: tiny_config(tmp_path / name, "--exemplars", str(tmp_path / "ex.json"), "--max-steps", "4",
                                   "--eval-every", "0", *setting)
    a = O.train(cfg("a"))

    def permuted(*args, **kw):
        tx, ty, vx, vy, C = real(*args, **kw)
        rest = ty[n:]
        ty = torch.cat([ty[:n], rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(5))]])
        return tx, ty, vx, vy, C
    monkeypatch.setattr(O, "make_synthetic", permuted)
    assert not torch.equal(O.load_data(cfg("b"))[1], real(10, 32, seed=0)[1])
    b = O.train(cfg("b"))
    for (k, v), w in zip(params_of(a)[0].items(), params_of(b)[0].values()):
        assert torch.equal(v, w), k


def test_end_to_end_cli_and_knn_eval(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*TINY, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert {"config.json", "metrics.jsonl", "last.pt"} <= set(os.listdir(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for key in ("loss", "resa", "align", "disp", "mix_proto", "mix_ins", "lr", "momentum", "seconds",
                "images_per_s", "knn5", "knn20_cos", "knn200_cos", "nbr_precision", "assign_entropy", "usage_entropy"):
        assert key in rows[-1], key
    for row in rows:  # entropies of distributions over C = 10 prototypes lie in [0, log 10]
        assert 0 <= row["assign_entropy"] <= row["usage_entropy"] <= math.log(10) + 1e-6
        assert all(0 <= row[k] <= 1 for k in ("nbr_precision", "nbr_precision_online", "nbr_precision_momentum",
                                              "nbr_precision_h", "nbr_precision_z"))
    assert "epoch 2/2" in r.stdout
    e = run_cli("--checkpoint", str(out / "last.pt"), "--linear", script="knn_eval.py")
    assert e.returncode == 0, e.stderr
    for name in knn_eval.PROTOCOLS.values():
        assert name in e.stdout, name
    assert set(knn_eval.PROTOCOLS) <= set(json.loads((out / "eval.json").read_text()))
    # the results table and plot of several runs (here one OSESSL and one ReSA run)
    resa = tmp_path / "resa"
    assert run_cli(*TINY, "--lambda-proto", "0", "--mu-mix", "0", "--out", str(resa)).returncode == 0
    s = run_cli("--summarize", str(out), str(resa), "--plot", str(tmp_path / "p.png"), script="knn_eval.py")
    assert s.returncode == 0, s.stderr
    line = [x for x in s.stdout.splitlines() if "ReSA 5-NN" in x][0]
    osessl_acc, resa_acc = rows[-1]["knn5"], json.loads((resa / "metrics.jsonl").read_text().splitlines()[-1])["knn5"]
    assert f"{osessl_acc:.2f}" in line and f"{resa_acc:.2f}" in line
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_summarize_tells_stale_duplicate_and_in_training_figures_apart(tmp_path, capsys):
    """--summarize: an eval.json older than the run's last epoch is not used (said in a note), two
    folders holding the same run count once, every row says where its figures come from, and a run
    evaluated once is still drawn."""
    import re
    import shutil
    out = tmp_path / "run"
    assert O.train(tiny_config(tmp_path, "--eval-every", "0"))
    knn_eval.main(["--checkpoint", str(out / "last.pt")])
    shutil.copytree(out, tmp_path / "copy")
    capsys.readouterr()
    runs = knn_eval.summarize([str(out), str(tmp_path / "copy")], plot=str(tmp_path / "p.png"))
    text = capsys.readouterr().out
    assert len(runs) == 1 and "holds the same run as" in text and (tmp_path / "p.png").stat().st_size > 1000
    assert all(line.endswith("knn_eval") for line in text.splitlines() if "momentum" in line and "ReSA" in line)
    # another --select-space, or another encoder stem, is another experiment: a row of its own, not one more seed
    # another --select-space or --exemplars-per-class, or another encoder (--arch, --width, --stem), is another
    # experiment: a row of its own, not one more seed
    changes = dict(h=dict(select_space="encoding"), s3=dict(exemplars_per_class=3), r50=dict(arch="resnet50"),
                   w16=dict(width=16), pad=dict(stem="cifar-pad", lambda_proto=0.0, mu_mix=0.0))
    for name, change in changes.items():
        shutil.copytree(out, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **change}))
    knn_eval.summarize([str(out)] + [str(tmp_path / name) for name in changes])
    rows = [line for line in capsys.readouterr().out.splitlines() if "ReSA 5-NN" in line]
    assert len(rows) == 6 and all((line.startswith("synthetic (") and "(1)" in line) or "cifar-pad" in line
                                  for line in rows)
    default = [line for line in rows if "resnet18, width 8)" in line]
    settings = sorted(re.search(r"momentum/joint\S*", line).group() for line in default)
    assert settings == ["momentum/joint", "momentum/joint/S3", "momentum/joint/h"]
    assert sum("resnet50" in line for line in rows) == sum("width 16" in line for line in rows) == 1
    assert all(line.split()[-2] == "-" for line in rows)  # the only ReSA run has another stem: no gain anywhere
    O.train(O.parse_config(["--resume", str(out / "last.pt"), "--epochs", "3"]))  # extended after evaluation
    assert "the lr and EMA schedules are recomputed for 3" in capsys.readouterr().out
    runs = knn_eval.summarize([str(out)])
    text = capsys.readouterr().out
    assert "stale, not used" in text and runs[0]["epochs"] == 3
    assert all(src == "in-training" for _, src in runs[0]["final"].values())
    O.train(O.parse_config(["--resume", str(out / "last.pt")]))  # finished: says so, writes nothing
    assert "has finished its 3 epochs" in capsys.readouterr().out


def test_reproduction_command_runs_tiny_detached_and_resumes(tmp_path):
    """results/cifar100-100ep/run.sh as CI runs it (TINY=1: synthetic data, width 8, 2 epochs, two arms,
    no compile): started detached, smoke, speed and the arms; the arms stopped early (--max-steps, as
    an interruption would) are not started again without the time to finish (FINISH_WITHIN), then are
    resumed by the same command, which skips what is done and finishes."""
    import time
    script = os.path.join(HERE, "results", "cifar100-100ep", "run.sh")
    env = dict(os.environ, TINY="1", OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"), PYTHON=sys.executable,
               ARM_FLAGS="--max-steps 3")
    sh = lambda *args: subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert "started" in sh("synthetic", "resa", "osessl-s0").stdout
    deadline = time.time() + 600
    while "is running" in sh("status").stdout and time.time() < deadline:
        time.sleep(2)
    log = (tmp_path / "out" / "run.log").read_text()
    assert "smoke passed" in log and "speed table written" in log and "stopped at epoch 0 of 2" in log, log
    assert "started" in sh("status").stdout
    del env["ARM_FLAGS"]
    env["FINISH_WITHIN"] = "0"  # no time left: the smoke test's epoch time says no arm can finish, none starts
    r = sh("--foreground", "synthetic", "resa", "osessl-s0")
    assert r.returncode == 1 and r.stdout.count("does not fit") == 2, r.stdout + r.stderr
    assert r.stdout.count("not started (FINISH_WITHIN)") == 2 and "--resume" not in r.stdout
    env["FINISH_WITHIN"] = "60"
    r = sh("--foreground", "synthetic", "resa", "osessl-s0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke: passed before, skipped" in r.stdout and "speed.txt exists, skipped" in r.stdout
    assert r.stdout.count("--resume") == 2 and "all done" in r.stdout
    for arm in ("resa", "osessl-s0"):
        rows = metrics(tmp_path / "out" / arm)
        assert [row["epoch"] for row in rows] == [1, 2]
        assert json.loads((tmp_path / "out" / arm / "eval.json").read_text())["step"] == rows[-1]["step"]
    assert "ReSA 5-NN" in (tmp_path / "out" / "summary.txt").read_text()
    assert (tmp_path / "out" / "plot.png").exists() and "ms/step" in (tmp_path / "out" / "speed.txt").read_text()
    assert sh("status").stdout.count(" done ") == 2
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".pt")]  # no checkpoint among the results


def test_channel_stats_are_the_population_mean_and_std_whatever_the_chunks():
    x = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = x.double() / 255
    for chunk_pixels in (1, 60, 2 ** 22):  # one image per chunk, two per chunk, all at once
        mean, std = O.channel_stats(x, chunk_pixels)
        assert torch.allclose(mean.double(), ref.mean((0, 2, 3)), rtol=1e-6)
        assert torch.allclose(std.double(), ref.std((0, 2, 3), correction=0), rtol=1e-6)


def test_finish_within_estimates_from_the_arms_own_epochs_else_the_smoke_tests(tmp_path, capsys):
    """run.sh's FINISH_WITHIN: an arm that has run is timed by its own recent epochs; one that has not, by
    the smoke test's last epoch (measured alone) times the arms at once; plus 10% and 90 s."""
    tools = load_script("results/cifar100-100ep/tools.py")
    fits = lambda seconds: tools.fits(str(tmp_path), "resa", 100, 2, seconds)  # 100 epochs, 2 arms at once
    assert fits(0)  # nothing measured yet: may start
    write = lambda d, secs: (os.makedirs(d, exist_ok=True), open(os.path.join(d, "metrics.jsonl"), "w").write(
        "".join(json.dumps(dict(epoch=e + 1, seconds=t)) + "\n" for e, t in enumerate(secs))))
    write(tmp_path / "smoke" / "eager", [9.0, 3.0])
    need = 100 * 3.0 * 2 * 1.1 + 90
    assert fits(need + 1) and not fits(need - 1)
    write(tmp_path / "resa", [20.0, 6.0, 6.0])  # its own epochs, already measured beside the other arm
    need = 97 * 6.0 * 1.1 + 90
    assert fits(need + 1) and not fits(need - 1)
    assert "does not fit" in capsys.readouterr().out


def test_knn_protocols_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 5
    y = torch.arange(500) % 5
    f = centres[y] + torch.randn(500, 16, generator=g)
    yt = torch.arange(100) % 5
    ft = centres[yt] + torch.randn(100, 16, generator=g)
    res = O.knn_report(f, y, ft, yt, 5)
    assert all(v > 95 for v in res.values())
    assert O.knn_accuracy(f, y[torch.randperm(500, generator=g)], ft, yt, 5) < 50


SMALL = ["--synthetic-per-class", "10", "--epochs", "2"]  # 90 unlabeled images: 2 steps of 32 per epoch


def test_linear_probe_is_resas_protocol():
    """ReSA's linear protocol (eval_sgd): Adam, lr 1e-2 decayed exponentially to 1e-6 over 500 epochs,
    weight decay 5e-6, batches of 1,000, raw features."""
    head = torch.nn.Linear(4, 3)
    opt, sched = knn_eval.probe_optimiser(head)
    assert isinstance(opt, torch.optim.Adam) and isinstance(sched, torch.optim.lr_scheduler.ExponentialLR)
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["weight_decay"] == 5e-6
    for _ in range(500):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6, rel=1e-9)
    import inspect
    defaults = {k: v.default for k, v in inspect.signature(knn_eval.linear_probe).parameters.items()}
    assert defaults["epochs"] == 500 and defaults["batch_size"] == 1000


def test_linear_probe_and_one_shot_classifiers():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    y, yt = torch.arange(500) % 5, torch.arange(100) % 5
    f = F.normalize(centres[y] + 0.1 * torch.randn(500, 16, generator=g), dim=1)
    ft = F.normalize(centres[yt] + 0.1 * torch.randn(100, 16, generator=g), dim=1)
    assert knn_eval.linear_probe(f, y, ft, yt, 5, epochs=100, batch_size=50) > 95
    assert knn_eval.linear_probe(f, y[torch.randperm(500, generator=g)], ft, yt, 5, epochs=100, batch_size=50) < 50
    acc = knn_eval.one_shot(ft, yt, centres, centres)
    assert acc["oneshot_exemplar"] > 95 and acc["oneshot_prototype"] > 95
    assert knn_eval.one_shot(ft, yt, centres.roll(1, 0), centres)["oneshot_exemplar"] < 5  # exemplar c must be class c


SLOW = pytest.mark.skipif(not os.environ.get("OSESSL_SLOW"), reason="inductor compiles for minutes on a CPU: set OSESSL_SLOW=1")


UNEVEN = ("--exemplars-per-class", "3", "--exemplar-bn", "alone", "--synthetic-classes", "5")  # 15 exemplars, 2 processes


@pytest.mark.parametrize("flags", [(), *EXEMPLAR_FORWARD[1:], UNEVEN, pytest.param(("--compile",), marks=SLOW)],
                         ids=["eager", *EXEMPLAR_IDS[1:], "3-per-class-uneven", "compiled"])
def test_two_process_torchrun_matches_one_process(tmp_path, flags):
    """DDP equivalence: 2 processes x 16 images compute what 1 process x 32 does, for the full
    objective (global Sinkhorn, memory bank, instance-mixup targets, synchronised BatchNorm, each
    process its shard of the permutation). In float64 the two agree to 1e-9 over 4 steps. (In float32
    reduction order gives ~2e-5 relative gradient noise, which a discrete top-k neighbour choice
    can amplify after a few steps: that is roundoff, not a different computation.) The compiled
    variant runs the 2 processes with --compile: the collectives inside the compiled objective. Each
    exemplar-forward setting holds too (each process forwards its share of the exemplars)."""
    common = TINY + SMALL + ["--float64"]
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    r = run_cli(*common, *flags, "--batch-size", "16", "--out", str(ddp),
                launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2
    r = run_cli(*common, *[f for f in flags if f != "--compile"], "--out", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = lambda d: [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    assert len(rows(one)) == len(rows(ddp)) == 2
    for a, b in zip(rows(one), rows(ddp)):
        for k in ("loss", "resa", "align", "disp", "mix_proto", "mix_ins", "nbr_precision", "knn5"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    ca, cb = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (one, ddp))
    for part in ("net", "momentum"):
        for k, v in ca[part].items():  # BatchNorm running statistics included: each exemplar is forwarded once
            assert torch.allclose(v, cb[part][k], rtol=1e-9, atol=1e-9), (part, k, (v - cb[part][k]).abs().max())
    for k in ("feats", "select"):  # select: the backbone features of --select-space encoding
        assert k not in ca["bank"] or torch.allclose(ca["bank"][k], cb["bank"][k], rtol=1e-9, atol=1e-9), k
    assert torch.equal(ca["bank"]["ids"], cb["bank"]["ids"])


def test_several_exemplars_per_class_build_each_prototype_from_their_own_class():
    """--exemplars-per-class S (the paper's "Ours*", more labels than one per class): class c's S labeled
    embeddings are all members of its prototype and their normalised mean (class_anchor) scores the bank and
    weighs the members; prototype c depends on class c's S embeddings alone (the choice of neighbours reads
    the others, detached); S = 1 is the one-shot method exactly; float64 gradient check."""
    C, S = 4, 3
    z, bank, valid = unit(C * S, 6, seed=21).view(C, S, 6).requires_grad_(), unit(12, 6, seed=10), torch.ones(12) > 0
    protos, idx, w = O.build_prototypes(z, bank, valid, k=3)
    anchor = F.normalize(z.detach().mean(1), dim=-1)
    by_anchor = O.discriminative_scores(bank, anchor).topk(3, dim=1).indices
    members = torch.cat([z.detach(), bank[idx]], 1)  # (C, S + k, d): the first S are class c's own
    assert torch.equal(idx, by_anchor) and w.shape == (C, S + 3)
    assert torch.allclose(w, (anchor[:, None] * members).sum(-1).softmax(1))
    assert torch.allclose(protos, F.normalize((w[..., None] * members).sum(1), dim=-1))
    jac = torch.autograd.functional.jacobian(lambda e: O.build_prototypes(e, bank, valid, k=3)[0], z.detach())
    for c in range(C):  # d prototype c / d exemplar (c', s): zero unless c' = c
        assert jac[c, :, c].abs().sum() > 0 and all(jac[c, :, o].abs().sum() == 0 for o in range(C) if o != c)
    assert torch.autograd.gradcheck(lambda e: O.build_prototypes(e, bank, valid, 3, 0.75, 0.5)[0], (z,))
    one, _, _ = proto_inputs()  # S = 1, as (C, d) or (C, 1, d): the one-shot formula written out, bit for bit
    top, nbr = O.discriminative_scores(bank, one.detach()).topk(3, dim=1)
    members = torch.cat([one[:, None], bank[nbr]], 1)
    weights = ((one[:, None] * members).sum(-1) / 1.0).softmax(1)
    paper = F.normalize((weights[..., None] * members).sum(1), dim=-1), nbr, weights
    for given in (one, one[:, None]):
        assert all(torch.equal(a, b) for a, b in zip(O.build_prototypes(given, bank, valid, k=3), paper))


def test_resa_draws_the_exemplar_views_it_does_not_use(tmp_path, monkeypatch):
    """ReSA (no exemplars) draws C x S exemplar views each step like OSESSL, so that the draws after them (the
    blur coin and sigma, at --blur on) are the same stream in both arms and in checkpoints of either age."""
    counts, real = [], O.step_randomness
    monkeypatch.setattr(O, "step_randomness", lambda *a, **kw: counts.append(a[3]) or real(*a, **kw))
    O.train(tiny_config(tmp_path, *SMALL, "--lambda-proto", "0", "--mu-mix", "0", "--blur", "on", "--max-steps", "2",
                        "--exemplars-per-class", "2", "--eval-every", "0"))
    assert counts == [20, 20]


def test_several_exemplars_per_class_train_resume_and_evaluate(tmp_path, capsys):
    """--exemplars-per-class 3: three distinct labeled images per class, class by class, out of D_u, in the
    checkpoint and config.json; the run trains, resumes (another S is refused), knn_eval evaluates it;
    --exemplars FILE takes S of each class in any order; S = 1 draws the exemplars it always drew."""
    out = O.train(tiny_config(tmp_path, *SMALL, "--exemplars-per-class", "3", "--eval-every", "2"))
    ck = O.read_checkpoint(os.path.join(out, "last.pt"))
    tx, ty, *_ = O.make_synthetic(10, 10)
    ex = ck["exemplars"]
    assert len(set(ex.tolist())) == 30 and torch.equal(ty[ex], torch.arange(10).repeat_interleave(3))
    assert json.load(open(os.path.join(out, "config.json")))["exemplar_indices"] == ex.tolist()
    assert "nbr_precision_h" in json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    err = one_line_exit_2(O.main, ["--resume", os.path.join(out, "last.pt"), "--exemplars-per-class", "2"], capsys)
    assert "has --exemplars-per-class 3, this run --exemplars-per-class 2" in err
    O.train(O.parse_config(["--resume", os.path.join(out, "last.pt"), "--epochs", "3"]))
    assert {"oneshot_exemplar", "oneshot_prototype"} <= set(knn_eval.main(["--checkpoint", os.path.join(out, "last.pt")]))
    mixed = ex.flip(0).tolist()  # S of each class, in any order: sorted class by class
    (tmp_path / "ex.json").write_text(json.dumps(mixed))
    cfg = O.parse_config(TINY + SMALL + ["--exemplars-per-class", "3", "--exemplars", str(tmp_path / "ex.json")])
    assert torch.equal(ty[O.select_exemplars(cfg, ty, 10)], torch.arange(10).repeat_interleave(3))
    (tmp_path / "two.json").write_text(json.dumps(mixed[:20]))
    with pytest.raises(O.UsageError, match="30 training indices .*3 of each class"):
        O.select_exemplars(O.replace(cfg, exemplars=str(tmp_path / "two.json")), ty, 10)
    one = O.select_exemplars(O.parse_config(TINY), ty, 10)  # the one-shot draw, as before the flag
    g = torch.Generator().manual_seed(0)
    assert one.tolist() == [int((ty == c).nonzero().flatten()[torch.randint(int((ty == c).sum()), (1,), generator=g)])
                            for c in range(10)]


def test_exemplar_select_momentum_scores_the_bank_but_members_stay_online():
    """--exemplar-select momentum (METHOD.md section 4 leaves it open): another embedding of the exemplars
    chooses the top-k; the prototype members and weights are still the online z_l, with gradient."""
    ex, bank, valid = proto_inputs()
    other = unit(4, 6, seed=7)
    protos, idx, w = O.build_prototypes(ex, bank, valid, k=3, select_by=other)
    by_other = O.discriminative_scores(bank, other).masked_fill(~valid[None], float("-inf")).topk(3, dim=1).indices
    assert torch.equal(idx, by_other)
    assert not torch.equal(idx, O.build_prototypes(ex, bank, valid, k=3)[1])  # the choice really changed
    members = torch.cat([ex[:, None], bank[idx]], 1)
    assert torch.allclose(w, ((ex[:, None] * members).sum(-1)).softmax(1))  # weights from z_l, tau_w = 1
    f = lambda e: O.build_prototypes(e, bank, valid, 3, 0.75, 0.5, select_by=other)[0]
    assert torch.autograd.gradcheck(f, (ex.clone().requires_grad_(),))


def test_select_space_encoding_chooses_by_the_other_features_and_builds_from_embeddings():
    """select_feats (--select-space encoding): the exemplars' other vectors score the entries' other
    features, so the choice follows their ranking; the prototype is still built from the embeddings."""
    ex, bank, valid = proto_inputs()
    h_bank, h_ex = unit(len(bank), 5, seed=11), unit(len(ex), 5, seed=12)
    protos, idx, w = O.build_prototypes(ex, bank, valid, k=3, select_by=h_ex, select_feats=h_bank)
    by_h = O.discriminative_scores(h_bank, h_ex).masked_fill(~valid[None], float("-inf")).topk(3, dim=1).indices
    assert torch.equal(idx, by_h) and not torch.equal(idx, O.build_prototypes(ex, bank, valid, k=3)[1])
    members = torch.cat([ex[:, None], bank[idx]], 1)
    assert torch.allclose(w, ((ex[:, None] * members).sum(-1)).softmax(1))
    assert torch.allclose(protos, F.normalize((w[..., None] * members).sum(1), dim=-1))


def test_select_space_encoding_in_the_step(monkeypatch):
    """--select-space encoding (default --exemplar-select momentum, --exemplar-bn joint): the bank keeps the
    normalised momentum backbone features of its entries, and the neighbours are those that the momentum
    network's normalised exemplar features rank first among them (computed here by hand)."""
    import copy
    run, tx, C = tiny_run("--select-space", "encoding")
    for step in range(3):  # fill the bank
        tiny_step(run, tx, C, torch.arange(step * 32, step * 32 + 32), step)
    ids = torch.arange(40, 72)
    rnd, x1, x2, xm, xe = step_inputs(run, tx, C, ids, step=3)
    momentum = copy.deepcopy(run.momentum_net)
    calls = record(monkeypatch, "osessl_loss")
    O.training_step(run, x1, x2, ids, rnd, 0.05, 0.99)
    _, kw, (_, _, nbr) = calls[0]
    with torch.no_grad():
        h = momentum(torch.cat([x1, xe]), x2)[0]
    h_ex = F.normalize(h[32:], dim=-1)
    assert torch.allclose(kw["select_by"], h_ex) and kw["bank_select"].shape == (len(run.bank.feats), 64)
    scores = O.discriminative_scores(kw["bank_select"], h_ex).masked_fill(~kw["bank_valid"][None], float("-inf"))
    assert torch.equal(nbr, scores.topk(run.cfg.k, dim=1).indices)
    slots = (run.bank.ptr - 32 + torch.arange(32)) % len(run.bank.feats)  # this step's entries, normalised h
    assert torch.equal(run.bank.ids[slots], ids)
    assert torch.allclose(run.bank.select[slots], F.normalize(h[:32], dim=-1), atol=1e-6)


def step_inputs(run, tx, C, ids, step=0):
    """The weak, strong, mixed and exemplar views objective() builds for step `step` (one process)."""
    rnd = O.step_randomness(0, step, len(ids), C, 1.0, torch.device("cpu"))
    x1, x2 = run.augment(run, tx[ids], rnd)
    b = rnd.beta.view(-1, 1, 1, 1)
    xe = O.augment(run.exemplar_images, rnd.exemplar, run.mean, run.std, strong=False)
    return rnd, x1, x2, b * x1 + (1 - b) * x2[rnd.partner], xe


def record(monkeypatch, name):
    """Calls of O.<name>: their arguments and results."""
    calls, real = [], getattr(O, name)

    def spy(*a, **k):
        calls.append((a, k, real(*a, **k)))
        return calls[-1][2]
    monkeypatch.setattr(O, name, spy)
    return calls


def test_exemplar_select_momentum_in_the_step(monkeypatch):
    """The neighbours are those that the momentum network's exemplar embeddings choose (computed here by
    hand: its own BatchNorm batch, --exemplar-bn alone); the members are the online embeddings."""
    import copy
    run, tx, C = tiny_run("--exemplar-select", "momentum", "--exemplar-bn", "alone")
    for step in range(3):  # fill the bank
        tiny_step(run, tx, C, torch.arange(step * 32, step * 32 + 32), step)
    ids = torch.arange(40, 72)
    rnd, x1, x2, xm, xe = step_inputs(run, tx, C, ids, step=3)
    momentum, online = copy.deepcopy(run.momentum_net), copy.deepcopy(run.net)
    calls = record(monkeypatch, "osessl_loss")
    O.objective(run, x1, x2, ids, rnd)
    _, kw, (_, _, nbr) = calls[0]
    ex, bank, valid = kw["z_ex"], kw["bank"], kw["bank_valid"]
    with torch.no_grad():
        zm = momentum(x1, x2, xe)[1][2]
        zl = online(x1, x2, xm, xe)[1][3]
    assert torch.allclose(kw["select_by"], zm) and torch.allclose(ex, zl)
    by_hand = O.discriminative_scores(bank, zm).masked_fill(~valid[None], float("-inf")).topk(run.cfg.k, dim=1).indices
    assert torch.equal(nbr, by_hand)
    assert ex.requires_grad and not kw["select_by"].requires_grad


def test_exemplar_bn_joint_in_the_step(monkeypatch):
    """--exemplar-bn joint: the exemplars share the weak views' BatchNorm batch; the exemplar embeddings
    are the last C rows of that forward, and the losses see its first B rows as z_1."""
    import copy
    run, tx, C = tiny_run("--exemplar-select", "online", "--exemplar-bn", "joint")
    ids = torch.arange(32)
    rnd, x1, x2, xm, xe = step_inputs(run, tx, C, ids)
    online = copy.deepcopy(run.net)
    protos, resa = record(monkeypatch, "build_prototypes"), record(monkeypatch, "resa_loss")
    O.objective(run, x1, x2, ids, rnd)
    with torch.no_grad():
        h, z = online(torch.cat([x1, xe]), x2, xm)
    assert torch.allclose(protos[0][0][0], z[0][32:])  # the C exemplar embeddings
    z1, z2 = resa[0][0][:2]
    assert z1.shape[0] == 32 and torch.allclose(z1, z[0][:32]) and torch.allclose(z2, z[1])
    with torch.no_grad():  # and not what a separate exemplar batch gives
        assert not torch.allclose(online(x1, x2, xm, xe)[1][0], z1, atol=1e-4)


# ---------------- trustworthy runs: resume, preemption, divergence, bad input ----------------
TIMING = ("seconds", "images_per_s")


def metrics(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def assert_same_state(a, b):
    ca, cb = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (a, b))
    for part in ("net", "momentum"):
        for k, v in ca[part].items():
            assert torch.equal(v, cb[part][k]), (part, k)
    for k, v in ca["bank"].items():
        assert torch.equal(v, cb["bank"][k]), k
    sa, sb = ca["opt"]["state"], cb["opt"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert ca["step"] == cb["step"]


def test_resume_is_exact(tmp_path):
    """N steps straight == N/2 steps, stop, --resume, N/2 more: bit-identical on CPU."""
    args = TINY + SMALL + ["--epochs", "4"]
    straight = O.train(O.parse_config(args + ["--out", str(tmp_path / "a"), "--max-steps", "6"]))
    half = O.train(O.parse_config(args + ["--out", str(tmp_path / "b"), "--max-steps", "3"]))
    resumed = O.train(O.parse_config(["--resume", os.path.join(half, "last.pt"), "--max-steps", "6"]))
    assert resumed == half
    assert_same_state(straight, resumed)
    assert metrics(straight) == metrics(resumed) and len(metrics(straight)) == 3


def test_a_resumed_run_uses_its_own_optimiser_settings(tmp_path, monkeypatch):
    """A checkpoint's optimiser carries the settings of the machine that saved it: fused SGD (a CUDA run)
    and its momentum buffers' memory layout. Resumed elsewhere, the run uses its own: on the CPU no fused
    SGD (which would read buffers of another layout as flat memory), the buffers in its parameters'
    layout (--memory-format), and a --weight-decay given on the command line."""
    out = O.train(O.parse_config(TINY + SMALL + ["--epochs", "4", "--max-steps", "2", "--out", str(tmp_path / "a")]))
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    for group in ck["opt"]["param_groups"]:
        group["fused"] = True  # as a CUDA run saves it
    (tmp_path / "gpu").mkdir()
    torch.save(ck, tmp_path / "gpu" / "last.pt")
    runs = record(monkeypatch, "build_run")
    again = ["--memory-format", "channels_last", "--weight-decay", "0.001", "--max-steps", "3"]
    for name, saved in (("b", tmp_path / "gpu" / "last.pt"), ("c", os.path.join(out, "last.pt"))):
        O.train(O.parse_config(["--resume", str(saved), "--out", str(tmp_path / name), *again]))
    opt = runs[0][2].opt
    assert all(g["fused"] is None and g["weight_decay"] == 0.001 for g in opt.param_groups)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in opt.state)  # channels_last parameters
    assert all(s["momentum_buffer"].stride() == p.stride() for p, s in opt.state.items())
    assert_same_state(tmp_path / "b", tmp_path / "c")


def test_a_stopping_run_skips_a_due_evaluation_but_not_the_last(tmp_path, monkeypatch):
    """Stopped (SIGTERM) at the end of an epoch whose k-NN evaluation is due, the run logs the epoch's row
    without it and saves at once (torchrun kills 30 s after SIGTERM; an ImageNet evaluation takes longer).
    Stopped at the last step, it still evaluates: a finished run is never resumed to evaluate it."""
    evals = record(monkeypatch, "evaluate")
    monkeypatch.setattr(O.Preemption, "requested", lambda self, step, world: bool(setattr(self, "signum", 15)) or
                        step in (2, 4))
    args = TINY + SMALL + ["--out", str(tmp_path / "run")]  # 2 steps per epoch, evaluated every epoch
    with pytest.raises(O.Interrupted, match="stopped by SIGTERM at step 2"):
        O.train(O.parse_config(args))
    assert not evals and [("knn5" in r) for r in metrics(tmp_path / "run")] == [False]
    with pytest.raises(O.Interrupted, match="stopped by SIGTERM at step 4"):
        O.train(O.parse_config(["--resume", str(tmp_path / "run" / "last.pt")]))
    assert len(evals) == 1 and [("knn5" in r) for r in metrics(tmp_path / "run")] == [False, True]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4


def test_keep_every_keeps_the_checkpoint_of_those_epochs(tmp_path):
    """--keep-every N keeps epoch<N>.pt, epoch<2N>.pt, ... beside last.pt (notebook 1 follows training
    with them): each is the whole checkpoint at the end of its epoch, so that resuming it reproduces
    the straight run exactly."""
    run = O.train(O.parse_config(TINY + SMALL + ["--epochs", "3", "--keep-every", "2", "--out", str(tmp_path / "a")]))
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == ["epoch2.pt", "last.pt"]
    ck = torch.load(os.path.join(run, "epoch2.pt"), weights_only=True)
    assert (ck["epoch"], ck["step"]) == (2, 4)
    resumed = O.train(O.parse_config(["--resume", os.path.join(run, "epoch2.pt"), "--out", str(tmp_path / "b")]))
    assert_same_state(run, resumed)
    assert metrics(resumed) == metrics(run)[2:]


def test_same_seed_same_metrics(tmp_path):
    """Determinism on CPU: the same command twice gives the same metrics (timing fields aside)."""
    a = O.train(O.parse_config(TINY + SMALL + ["--out", str(tmp_path / "a")]))
    b = O.train(O.parse_config(TINY + SMALL + ["--out", str(tmp_path / "b")]))
    assert metrics(a) == metrics(b)
    assert_same_state(a, b)


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "osessl.py"), *TINY, "--epochs", "1000", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "osessl:" in p.stdout.readline()  # training has started
    time.sleep(3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM
    assert "--resume" in err and "Traceback" not in err
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] > 0
    r = run_cli("--resume", str(out / "last.pt"), "--max-steps", str(ck["step"] + 1))
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == ck["step"] + 1


def test_checkpoint_write_is_atomic(tmp_path):
    path = str(tmp_path / "last.pt")
    O.save_checkpoint(path, {"format": 1, "good": True})
    with pytest.raises(Exception):
        O.save_checkpoint(path, {"format": 1, "unpicklable": lambda: 0})  # crashes while writing
    assert torch.load(path, weights_only=True)["good"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = O.dispersion_loss, []

    def breaks_at_step_4(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 5 else 1)
    monkeypatch.setattr(O, "dispersion_loss", breaks_at_step_4)
    cfg = O.parse_config(TINY + SMALL + ["--epochs", "4", "--out", str(tmp_path / "run")])
    with pytest.raises(O.Interrupted, match=r"non-finite loss at step 4 \(disp, loss\)") as e:
        O.train(cfg)
    assert e.value.code == 3
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4  # end of epoch 2, intact
    assert len(metrics(tmp_path / "run")) == 2


def test_refuses_to_overwrite_another_run(tmp_path):
    first = O.train(O.parse_config(TINY + SMALL + ["--max-steps", "1", "--out", str(tmp_path / "run")]))
    before = open(os.path.join(first, "last.pt"), "rb").read()
    with pytest.raises(O.UsageError, match="already holds a run.*--resume.*--overwrite"):
        O.train(O.parse_config(TINY + SMALL + ["--max-steps", "1", "--out", first]))
    assert open(os.path.join(first, "last.pt"), "rb").read() == before
    O.train(O.parse_config(TINY + SMALL + ["--max-steps", "1", "--out", first, "--overwrite"]))


def write_imagefolder(root, classes=("a", "b"), per_class=3):
    from PIL import Image
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(root / split / c / f"{i}.png")


def test_imagefolder_cache_is_reused_refreshed_and_survives_damage(tmp_path):
    """The decoded ImageFolder is cached beside the data: reused while the files are unchanged,
    rebuilt when they change, and a damaged cache (say, two runs writing at once) is decoded anew."""
    write_imagefolder(tmp_path)
    x, y, classes = O.load_imagefolder_split(str(tmp_path), "train")
    cache = tmp_path / ".osessl-cache-train.pt"
    assert cache.exists() and classes == ["a", "b"] and x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    torch.save({"key": torch.load(cache)["key"], "x": x + 1, "y": y}, cache)  # a marker: is the cache read?
    assert torch.equal(O.load_imagefolder_split(str(tmp_path), "train")[0], x + 1)
    from PIL import Image
    Image.fromarray(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()).save(tmp_path / "train" / "b" / "9.png")
    x2, y2, _ = O.load_imagefolder_split(str(tmp_path), "train")  # a new file: decoded again
    assert len(x2) == 7 and torch.equal(x2[:6], x) and x2[6].sum() == 0
    cache.write_bytes(b"half a file")
    assert torch.equal(O.load_imagefolder_split(str(tmp_path), "train")[0], x2)
    assert torch.equal(torch.load(cache)["x"], x2) and not list(tmp_path.glob("*.tmp"))


def write_photo_folder(root, per_class=6):
    """An ordinary photo folder: mixed sizes and aspect ratios, grayscale, palette, RGBA PNG and CMYK JPEG
    images, and files that are not images."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    sizes = [(50, 40), (37, 61), (80, 80), (45, 45), (120, 48), (41, 90)]
    modes = ["RGB", "L", "P", "RGBA", "CMYK", "RGB"]
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[i % 6]
                rgb = Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy())
                mode = modes[i % 6]
                img = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
                img.save(root / split / c / f"{i}.{'jpg' if mode in ('CMYK', 'L') else 'png'}")
            (root / split / c / "notes.txt").write_text("not an image")
            (root / split / c / "Thumbs.db").write_bytes(b"\x00" * 64)


def test_any_imagefolder_resized_once_to_image_size(tmp_path, capsys, monkeypatch):
    write_photo_folder(tmp_path / "photos")
    d = str(tmp_path / "photos")
    with monkeypatch.context() as m:  # a split larger than the host's memory: stopped before decoding
        m.setattr(O, "host_memory_bytes", lambda: 2 ** 20)
        with pytest.raises(O.UsageError, match=r"needs 0.00 GiB.*give a smaller --image-size"):
            O.load_imagefolder_split(d, "train", 200)
        assert not (tmp_path / "photos" / ".osessl-cache-train.pt").exists()
    x, y, classes = O.load_imagefolder_split(d, "train", 40)
    assert x.shape == (12, 3, 40, 40) and classes == ["cat", "dog"] and y.tolist() == [0] * 6 + [1] * 6
    from PIL import Image
    with Image.open(tmp_path / "photos" / "train" / "cat" / "4.jpg") as im:  # the CMYK JPEG
        assert im.mode == "CMYK"
    gray = x[1]  # a grayscale image: three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    x36, _, _ = O.load_imagefolder_split(d, "train", 36)  # another size: the cache is rebuilt
    assert x36.shape[2:] == (36, 36)
    assert torch.load(tmp_path / "photos" / ".osessl-cache-train.pt", weights_only=True)["x"].shape[2:] == (36, 36)
    capsys.readouterr()
    # without --image-size: every image to the first one's short side (cat/0.png is 50 x 40), said and recorded
    out = O.train(O.parse_config(["--dataset", "imagefolder", "--data-dir", d, "--width", "8",
                                  "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "4", "--bank-size", "16",
                                  "--k", "2", "--epochs", "2", "--eval-every", "1", "--out", str(tmp_path / "run")]))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["image_size"] == 40 and cfg["stem"] == "cifar" and cfg["blur"] == "off"
    assert "images: (3, 40, 40) uint8" in capsys.readouterr().out
    assert len(metrics(out)) == 2
    e = run_cli("--checkpoint", os.path.join(out, "last.pt"), script="knn_eval.py")  # decodes at the run's size
    assert e.returncode == 0, e.stderr


def test_data_on_host_trains_as_on_device_and_auto_decides(tmp_path, monkeypatch, capsys):
    args = TINY + SMALL + ["--max-steps", "3", "--eval-every", "0"]
    a = O.train(O.parse_config(args + ["--out", str(tmp_path / "a"), "--data-on", "device"]))
    b = O.train(O.parse_config(args + ["--out", str(tmp_path / "b"), "--data-on", "host"]))
    assert "on the host (--data-on host)" in capsys.readouterr().out
    assert_same_state(a, b)
    monkeypatch.setattr(O, "device_free_bytes", lambda device: 10_000)  # a device too small for the images
    O.train(O.parse_config(args + ["--out", str(tmp_path / "c")]))
    assert "on the host (--data-on auto)" in capsys.readouterr().out
    monkeypatch.setattr(O, "device_free_bytes", lambda device: 10 ** 12)
    O.train(O.parse_config(args + ["--out", str(tmp_path / "d")]))
    assert "on the device (--data-on auto)" in capsys.readouterr().out


def test_stem_follows_the_image_size_and_matches_torchvision():
    import torchvision
    cfg = O.parse_config(TINY)
    assert (O.settle(cfg, 64).stem, O.settle(cfg, 65).stem) == ("cifar", "imagenet")
    assert (O.settle(cfg, 64).blur, O.settle(cfg, 65).blur) == ("off", "on")
    assert O.settle(O.parse_config(TINY + ["--stem", "cifar", "--blur", "off"]), 224).stem == "cifar"
    ref, ours = torchvision.models.resnet18(), O.ResNet(64, "imagenet")
    ref.fc = torch.nn.Identity()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 96, 96)
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_resnet50_is_torchvisions_and_trains_a_step(tmp_path):
    """--arch resnet50, the paper's ImageNet-1K backbone: torchvision's resnet50 (state dicts interchange, same
    outputs), features of 32 x width (2048 at width 64) that flow unchanged through the projector, the memory
    bank's backbone features (--select-space encoding), the in-training k-NN and knn_eval.py."""
    import torchvision
    ref, ours = torchvision.models.resnet50(), O.ResNet(64, "imagenet", "resnet50")
    ref.fc = torch.nn.Identity()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5) and ours(x).shape == (2, 2048)
    out = O.train(tiny_config(tmp_path, *SMALL, "--arch", "resnet50", "--select-space", "encoding"))
    ck = O.read_checkpoint(os.path.join(out, "last.pt"))
    assert ck["bank"]["select"].shape == (128, 32 * 8) and ck["momentum"]["projector.0.weight"].shape == (64, 256)
    assert "knn5" in json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    assert "oneshot_prototype" in knn_eval.main(["--checkpoint", os.path.join(out, "last.pt")])


def test_both_stems_train_a_step(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            os.makedirs(tmp_path / split / c)
            for i in range(4):
                Image.fromarray(torch.randint(0, 256, (72, 72, 3), dtype=torch.uint8).numpy()).save(tmp_path / split / c / f"{i}.png")
    for stem in ("cifar", "imagenet"):
        out = O.train(O.parse_config(["--dataset", "imagefolder", "--data-dir", str(tmp_path), "--stem", stem, "--width", "8",
                                      "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "4", "--bank-size", "8",
                                      "--k", "2", "--epochs", "1", "--max-steps", "2", "--eval-every", "0",
                                      "--out", str(tmp_path / stem)]))
        cfg = json.loads(open(os.path.join(out, "config.json")).read())
        assert cfg["stem"] == stem and cfg["blur"] == "on"  # 72 px: above 64, blur by default
        ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
        assert ck["net"]["encoder.conv1.weight"].shape[-1] == (3 if stem == "cifar" else 7)


def test_gaussian_blur_per_sample_matches_torchvision():
    from torchvision.transforms import functional as TF
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 30, 30, generator=g)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = O.gaussian_blur(x, sigma, 7)
    for i in range(4):
        assert torch.allclose(out[i], TF.gaussian_blur(x[i], [7, 7], [sigma[i].item()] * 2), atol=1e-5), i
    r = O.step_randomness(3, 5, 64, 2, 1.0, torch.device("cpu"), size=96, blur=True)
    again = O.step_randomness(3, 5, 64, 2, 1.0, torch.device("cpu"), size=96, blur=True)
    plain = O.step_randomness(3, 5, 64, 2, 1.0, torch.device("cpu"), size=96)
    assert torch.equal(r.strong["sigma"], again.strong["sigma"]) and torch.equal(r.strong["blur"], again.strong["blur"])
    assert 0.1 <= r.strong["sigma"].min() and r.strong["sigma"].max() <= 2.0 and r.strong["sigma"].unique().numel() == 64
    assert 0 < r.strong["blur"].sum() < 64
    assert torch.equal(plain.strong["box"], r.strong["box"]) and torch.equal(plain.partner, r.partner)  # blur drawn last
    imgs = torch.randint(0, 256, (64, 3, 96, 96), dtype=torch.uint8)
    mean, std = torch.zeros(3), torch.ones(3)
    p = dict(r.strong, jitter=torch.zeros(64, dtype=torch.bool), gray=torch.zeros(64, dtype=torch.bool),
             solarize=torch.zeros(64, dtype=torch.bool))
    blurred, sharp = O.augment(imgs, p, mean, std, True), O.augment(imgs, {k: v for k, v in p.items() if k not in ("blur", "sigma")}, mean, std, True)
    changed = (blurred - sharp).abs().flatten(1).amax(1) > 1e-6
    assert not (changed & ~r.strong["blur"]).any()  # only the samples drawn for blur change
    visible = r.strong["blur"] & (r.strong["sigma"] > 0.25)  # near 0.1 px the kernel is the identity to 1e-6
    assert changed[visible].all() and visible.sum() > 10


def bad_inputs(tmp_path):
    write_imagefolder(tmp_path / "ok")
    write_imagefolder(tmp_path / "empty")
    for f in os.listdir(tmp_path / "empty" / "train" / "b"):
        os.remove(tmp_path / "empty" / "train" / "b" / f)
    write_imagefolder(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "train" / "a" / "1.png").write_bytes(b"not an image")
    (tmp_path / "notrain").mkdir()
    for name, text in (("bad.json", "[0, 1"), ("short.json", "[0]"), ("dup.json", "[0, 10]"), ("range.json", "[0, 99999]")):
        (tmp_path / name).write_text(text)
    good = O.train(O.parse_config(TINY + SMALL + ["--max-steps", "1", "--out", str(tmp_path / "good")]))
    torch.save({"format": 99, "config": {}}, tmp_path / "future.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 10)
    t, s = str(tmp_path), TINY + SMALL
    return [
        (["--dataset", "mnist"], "unknown --dataset"),
        (["--dataset", "imagefolder", "--data-dir", t + "/missing"], "does not exist"),
        (["--dataset", "imagefolder", "--data-dir", t + "/notrain"], "train is not a directory"),
        (["--dataset", "imagefolder", "--data-dir", t + "/empty"], "empty class folder"),
        (["--dataset", "imagefolder", "--data-dir", t + "/corrupt"], "1 unreadable image.*1.png"),
        (s + ["--exemplars", t + "/bad.json"], "bad.json: give a JSON list of 10 training indices"),
        (s + ["--exemplars", t + "/short.json"], "short.json: give a JSON list of 10 training indices"),
        (s + ["--exemplars", t + "/dup.json", "--synthetic-classes", "2"],
         "dup.json: give a JSON list of 2 .* 1 of each class"),
        (s + ["--exemplars", t + "/range.json", "--synthetic-classes", "2"],
         "range.json: give a JSON list of 2 training indices .0..19."),
        (s + ["--batch-size", "4096", "--bank-size", "8192"], "larger than the 90 unlabeled"),
        (s + ["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (s + ["--lr", "-1"], "--lr must be > 0"),
        (s + ["--tau-s", "0"], "--tau-s must be > 0"),
        (s + ["--tau-t", "-0.1"], "--tau-t must be > 0"),
        (s + ["--resa-temp", "0"], "--resa-temp must be > 0"),
        (s + ["--k", "0"], "--k must be >= 1"),
        (s + ["--k", "500"], "larger than the memory bank"),
        (s + ["--epochs", "two"], "invalid int value"),
        (s + ["--resume", t + "/nothing.pt"], "no such file"),
        (s + ["--resume", t + "/garbage.pt"], "not a readable checkpoint"),
        (s + ["--resume", t + "/foreign.pt"], "not an osessl checkpoint"),
        (s + ["--resume", t + "/future.pt"], "newer than this osessl.py"),
        (["--resume", os.path.join(good, "last.pt"), "--synthetic-classes", "5"], "with 10 classes, not synthetic with 5"),
        (["--resume", os.path.join(good, "last.pt"), "--dataset", "imagefolder", "--data-dir", t + "/ok"],
         "trained on synthetic, not imagefolder: pass the matching"),
    ]


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    for argv, message in bad_inputs(tmp_path):
        out = tmp_path / "never"
        with pytest.raises(SystemExit) as e:
            O.main(argv + (["--out", str(out)] if "--resume" not in argv else []))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, argv
        assert len(err.splitlines()) == 1 and err.startswith("error:"), (argv, err)
        import re
        assert re.search(message, err), (message, err)
        assert not out.exists(), argv
    # and through the real command line: no traceback, exit 2
    r = run_cli("--dataset", "imagefolder", "--data-dir", str(tmp_path / "corrupt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


class CreatesAFile:
    """Pickles into a call of open(path, "w"): loading it with pickle would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line_exit_2(fn, argv, capsys):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), (argv, err)
    return err


def test_a_crafted_checkpoint_never_runs_code(tmp_path):
    """Checkpoints are read with weights_only: a pickle that would run code is refused in one line by
    --resume and by knn_eval.py, and the code does not run."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": 1, "config": CreatesAFile(marker)}, evil)
    for args, script in ((["--resume", str(evil)], "osessl.py"), (["--checkpoint", str(evil)], "knn_eval.py")):
        r = run_cli(*args, script=script)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "not a readable checkpoint (UnpicklingError)" in r.stderr and "tensors and plain data only" in r.stderr
        assert not marker.exists(), script
    assert sorted(os.listdir(tmp_path)) == ["evil.pt"]  # nothing written beside it


def test_malformed_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    """Resuming and knn_eval.py refuse, in one line and before writing anything, a checkpoint that does
    not fit; each refuses only what it reads (knn_eval.py reads no online network, optimiser or RNG)."""
    good = O.train(O.parse_config(TINY + SMALL + ["--max-steps", "1", "--out", str(tmp_path / "good")]))
    ck = torch.load(os.path.join(good, "last.pt"), weights_only=True)
    net_wider = O.Network(16, 64, 32).state_dict()
    both, resume = (O.main, knn_eval.main), (O.main,)
    cases = {
        "no config": ({k: v for k, v in ck.items() if k != "config"}, "KeyError: 'config'", both),
        "config is a string": (dict(ck, config="--width 8"), "TypeError: .*must be a mapping, not str", both),
        "config of wrong types": (dict(ck, config=dict(ck["config"], width="8")),
                                  "TypeError: must be real number, not str",
                                  both),
        "unknown setting": (dict(ck, config=dict(ck["config"], colour="red")), "unexpected keyword argument 'colour'",
                            both),
        "bad setting": (dict(ck, config=dict(ck["config"], tau_s=-1.0)), "--tau-s must be > 0", both),
        "negative step": (dict(ck, step=-1), "step, classes, world size or global batch is not a count", both),
        "no num_classes": ({k: v for k, v in ck.items() if k != "num_classes"}, "KeyError: 'num_classes'", both),
        "no networks": ({k: v for k, v in ck.items() if k not in ("net", "momentum")},
                        "'(net|momentum)' does not fit this run .KeyError", both),
        "no momentum network": ({k: v for k, v in ck.items() if k != "momentum"},
                                "'momentum' does not fit this run .KeyError", both),
        "other network": (dict(ck, momentum=net_wider), "'momentum' does not fit this run .*size mismatch", both),
        "network missing a layer": (dict(ck, net={k: v for k, v in ck["net"].items() if "layer4" not in k}),
                                    "'net' does not fit this run .*Missing key", resume),
        "bank of other size": (dict(ck, bank=dict(ck["bank"], feats=torch.zeros(5, 32))),
                               "'bank' does not fit this run .*size mismatch for feats", both),
        "exemplars of other count": (dict(ck, exemplars=ck["exemplars"][:3]), "do not index images of each class", both),
        "exemplars out of range": (dict(ck, exemplars=ck["exemplars"] + 10 ** 6), "do not index images of each class",
                                   both),
        "optimiser of another network": (dict(ck, opt=dict(ck["opt"], state={0: {"momentum_buffer": torch.zeros(3)}})),
                                         "'opt' does not fit this run .ValueError: its momentum buffers", resume),
        "no rng": ({k: v for k, v in ck.items() if k != "rng"}, "random generator state", resume),
        "not a dict": ([1, 2, 3], "is not an osessl checkpoint", both),
    }
    import re
    for name, (obj, message, programs) in cases.items():
        path = tmp_path / "bad" / "last.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save(obj, path)
        before = sorted(os.listdir(path.parent)), path.read_bytes()
        for fn in programs:
            err = one_line_exit_2(fn, ["--resume" if fn is O.main else "--checkpoint", str(path)], capsys)
            assert re.search(message, err), (name, err)
            assert (sorted(os.listdir(path.parent)), path.read_bytes()) == before, name  # nothing written
    # the good one still resumes
    O.train(O.parse_config(["--resume", os.path.join(good, "last.pt"), "--max-steps", "2"]))


def test_a_crafted_cache_is_decoded_anew_not_run(tmp_path):
    write_imagefolder(tmp_path)
    x, y, _ = O.load_imagefolder_split(str(tmp_path), "train")
    cache, marker = tmp_path / ".osessl-cache-train.pt", tmp_path / "pwned"
    key = torch.load(cache, weights_only=True)["key"]
    for crafted in ({"key": key, "x": CreatesAFile(marker), "y": y},  # code
                    {"key": key, "x": x[:3], "y": y},  # the right key, the wrong images
                    {"key": key, "x": x.float(), "y": y}, [x, y]):
        torch.save(crafted, cache)
        x2, y2, _ = O.load_imagefolder_split(str(tmp_path), "train")
        assert torch.equal(x2, x) and torch.equal(y2, y) and not marker.exists()
        assert torch.equal(torch.load(cache, weights_only=True)["x"], x)  # rewritten


def test_a_read_only_data_folder_is_cached_in_the_user_cache(tmp_path, monkeypatch):
    """A data folder that cannot be written (a shared dataset store) is cached in $XDG_CACHE_HOME/osessl,
    under a name of its own path, and the next run reads it from there instead of decoding again."""
    for name in ("store", "other"):
        write_imagefolder(tmp_path / name)
    read_only = {str(tmp_path / "store"), str(tmp_path / "other")}
    real_access = os.access
    monkeypatch.setattr(O.os, "access", lambda p, mode: p not in read_only and real_access(p, mode))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    x, y, _ = O.load_imagefolder_split(str(tmp_path / "store"), "train")
    x2, _, _ = O.load_imagefolder_split(str(tmp_path / "other"), "train")
    assert not [n for n in os.listdir(tmp_path / "store") if n.startswith(".osessl")]
    assert len(os.listdir(tmp_path / "home" / "osessl")) == 2  # one cache per folder
    monkeypatch.setattr(O, "decode_split", lambda *a, **k: pytest.fail("decoded again"))
    x3, y3, _ = O.load_imagefolder_split(str(tmp_path / "store"), "train")
    assert torch.equal(x3, x) and torch.equal(y3, y)


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    """A cache write that fails (torch.save on a full disk raises RuntimeError, not OSError) costs only the
    cache: the decoded split is returned and no partial file is left behind."""
    write_imagefolder(tmp_path)
    real_save = torch.save

    def full_disk(obj, path):
        open(path, "wb").write(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(O.torch, "save", full_disk)
    x, _, _ = O.load_imagefolder_split(str(tmp_path), "train")
    monkeypatch.setattr(O.torch, "save", real_save)
    assert x.shape == (6, 3, 32, 32) and not [n for n in os.listdir(tmp_path) if n.startswith(".osessl")]


def test_offline_cifar_download_fails_clearly(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(O.UsageError, match="copy torchvision's cifar-100-python/ into --data-dir, or give an ImageFolder"):
        O.load_data(O.parse_config(["--dataset", "cifar100", "--data-dir", str(tmp_path)]))


def test_readme_section_map_is_current():
    """README's map of osessl.py gives each section's line range: keep it true."""
    import re
    banners = [i + 1 for i, line in enumerate(open(os.path.join(HERE, "osessl.py"))) if line.startswith("# ============")]
    n = sum(1 for _ in open(os.path.join(HERE, "osessl.py")))
    spans = [f"{a}-{b - 1}" for a, b in zip(banners, banners[1:] + [n + 1])]
    readme = open(os.path.join(HERE, "README.md")).read()
    assert re.findall(r"^\| (\d+-\d+) \| \d+\. ", readme, flags=re.M) == spans


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = torch.sort(a.double()).values, torch.sort(b.double()).values
    grid = torch.cat([a, b])
    cdf = lambda s: torch.searchsorted(s, grid, right=True).double() / len(s)
    return (cdf(a) - cdf(b)).abs().max().item()


def test_augmentation_parameters_match_torchvision_distributions():
    """The device-side sampler draws what torchvision's RandomResizedCrop(32, (0.2, 1)), flip,
    ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2 and solarize p=0.2 draw (KS statistic
    below 0.02 with 20,000 samples each; the 1% critical value is 0.016)."""
    from torchvision.transforms import ColorJitter, RandomResizedCrop
    n = 20_000
    ours = O.sample_view_params(n, O.step_generator(1, 0, torch.device("cpu")))
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=torch.float64)
    top, left, h, w = ours["box"].double().unbind(1)
    rtop, rleft, rh, rw = ref.unbind(1)
    assert _ks(h * w / 1024, rh * rw / 1024) < 0.02          # crop scale
    assert _ks(w / h, rw / rh) < 0.02                          # aspect ratio
    assert _ks(top, rtop) < 0.02 and _ks(left, rleft) < 0.02   # crop position
    jit = [ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.8, 1.2], [-0.1, 0.1]) for _ in range(n)]
    for j in range(4):
        assert _ks(ours["factors"][:, j], torch.tensor([float(x[j + 1]) for x in jit])) < 0.02
    first = torch.bincount(ours["order"][:, 0], minlength=4).double() / n
    assert torch.allclose(first, torch.full((4,), 0.25, dtype=torch.float64), atol=0.015)  # each op first equally often
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("solarize", 0.2)):
        assert ours[key].double().mean().item() == pytest.approx(rate, abs=0.012), key


def load_script(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(HERE, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_prints_its_table(capsys, monkeypatch):
    """results/benchmark.py with tiny settings prints every row (timings are not asserted), with
    --compile also the eager row beside it. (torch.compile is pointed at the aot_eager backend:
    inductor's code generation would take minutes on a CPU.)"""
    compile_ = torch.compile
    monkeypatch.setattr(O.torch, "compile", lambda f, mode=None: compile_(f, backend="aot_eager"))
    load_script("results/benchmark.py").main([*TINY, "--steps", "1", "--compile"])
    out = capsys.readouterr().out
    for row in ("device pipeline (data", "pre-made tensors", "augmentation alone", "ReSA-only", "PIL DataLoader",
                "eager (no --compile)", "channels_last layout", "k-NN evaluation of 320 + 80 images"):
        assert row in out, row
    assert "ms/step" in out and "s/epoch" in out and "compile default" in out
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["01_neighbor_selection", "02_prototype_construction"])
def test_notebook_executes_in_fast_mode(name, monkeypatch):
    """The teaching notebooks run top to bottom on synthetic data and a tiny fresh run (OSESSL_FAST=1)."""
    import nbclient
    import nbformat
    monkeypatch.setenv("OSESSL_FAST", "1")
    nb = nbformat.read(os.path.join(HERE, "notebooks", name + ".ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(HERE, "notebooks")}}).execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4


def tiny_run(*extra):
    cfg = O.parse_config(TINY + SMALL + list(extra))
    tx, ty, _, _, C = O.load_data(cfg)
    torch.manual_seed(cfg.seed)
    return O.build_run(cfg, 0, 1, torch.device("cpu"), tx, ty, O.select_exemplars(cfg, ty, C), C), tx, C


def tiny_step(run, tx, C, ids, step, lr=0.05, m=0.99):
    """One training step of a tiny_run on images ids, with step `step`'s random draws."""
    rnd = O.step_randomness(0, step, len(ids), C, 1.0, torch.device("cpu"))
    return O.training_step(run, *run.augment(run, tx[ids], rnd), ids, rnd, lr, m)


def test_bf16_autocast_and_channels_last_path_on_cpu():
    """The GPU settings (bf16 autocast, channels_last), emulated on the CPU: the step runs, the
    networks' outputs are cast back so that losses, targets and bank stay float32 and finite."""
    run, tx, C = tiny_run("--memory-format", "channels_last")
    run.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    assert run.net.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert run.to_net(tx[:2].float()).is_contiguous(memory_format=torch.channels_last)
    for step in range(3):
        losses = tiny_step(run, tx, C, torch.arange(step * 32, step * 32 + 32), step, 0.01, 0.996)
        assert all(v.dtype == torch.float32 and v.isfinite() for v in losses.values())
    assert run.bank.feats.dtype == torch.float32 and int(run.bank.filled) == 96


def test_memory_format_changes_the_layout_not_the_step():
    """--memory-format: channels_last on CUDA (auto), contiguous on the CPU unless asked; the same
    steps in either layout (float64, so that only roundoff may differ)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, last = O.parse_config(TINY), O.parse_config(TINY + ["--memory-format", "channels_last"])
    assert O.memory_format(auto, cpu) == torch.contiguous_format and O.memory_format(auto, cuda) == torch.channels_last
    assert O.memory_format(last, cpu) == torch.channels_last
    losses = []
    torch.set_default_dtype(torch.float64)
    try:
        for layout in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            run, tx, C = tiny_run("--memory-format", layout, "--float64", "--device", "cpu")
            losses.append([tiny_step(run, tx, C, torch.arange(s * 32, s * 32 + 32), s)["loss"] for s in range(3)])
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=0)


def test_compile_makes_the_whole_objective_one_graph_compiled_once():
    """--compile: augmentation and the objective (both networks, Sinkhorn, prototypes, every loss term)
    trace without a graph break (fullgraph) and compile once: steps with new images, a filling
    memory bank, new random draws and a new lr/EMA momentum reuse the graph. The compiled step gives
    the eager numbers. (The aot_eager backend traces forward and backward as inductor would, without
    generating code, so this runs in seconds on a CPU.)"""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    eager, tx, C = tiny_run()
    compiled, _, _ = tiny_run()
    counters = {name: CompileCounterWithBackend("aot_eager") for name in ("objective", "augment")}
    compiled.objective = torch.compile(O.objective, backend=counters["objective"], fullgraph=True)
    compiled.augment = torch.compile(O.augment_views, backend=counters["augment"], fullgraph=True)
    for step in range(5):
        ids, lr, m = torch.arange(step * 16, step * 16 + 32) % 90, 0.05 * (step + 1), 0.99 + 0.001 * step
        a, b = (tiny_step(run, tx, C, ids, step, lr, m) for run in (eager, compiled))
        assert a.keys() == b.keys() and {"align", "disp", "mix_proto", "mix_ins"} <= set(a)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (step, k, a[k], b[k])
    assert {k: c.frame_count for k, c in counters.items()} == {"objective": 1, "augment": 1}
    assert torch.allclose(eager.bank.feats, compiled.bank.feats, atol=1e-4)
    for (k, v), w in zip(eager.net.state_dict().items(), compiled.net.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), rtol=1e-3, atol=1e-5), k
    torch._dynamo.reset()


class HostSync(torch.overrides.TorchFunctionMode):
    """Raises on every torch call that makes the host wait for a GPU: a tensor's value read into
    Python, a copy to or from the host, and the ops whose output size depends on values
    (boolean-mask indexing, nonzero, masked_select, unique, one-argument where). On the CPU none of
    them waits, so the test looks for the calls themselves."""
    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
             "masked_select", "unique", "unique_consecutive", "bincount", "repeat_interleave", "tensor", "as_tensor", "from_numpy"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") else ()
        masks = [i for i in (index if isinstance(index, tuple) else (index,)) if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        to_host = name == "to" and any(str(a) == "cpu" for a in [*args[1:], *kwargs.values()])
        if name in self.READS or masks or to_host or (name == "where" and len(args) == 1):
            raise AssertionError(f"torch {name} inside a training step: the host would wait for the GPU")
        return func(*args, **kwargs)


def test_a_training_step_never_waits_for_the_device():
    """No host-device synchronisation per step: on a GPU each .item(), .cpu(), Python branch on a
    tensor value, host-to-device torch.tensor or boolean-mask index stalls the launch queue. Every
    such call raises (HostSync) while the step's randomness, augmentation and training_step run."""
    run, tx, C = tiny_run()
    with HostSync():
        for i in range(4):
            losses = tiny_step(run, tx, C, torch.arange(i * 32, i * 32 + 32) % 90, i)
    assert set(losses) >= {"loss", "resa", "align", "disp", "mix_proto", "mix_ins", "nbr_precision"}
    assert int(run.bank.filled) == 128
    with pytest.raises(AssertionError, match="torch nonzero"), HostSync():  # the detector itself works
        torch.arange(3).nonzero()


@SLOW
def test_inductor_compiled_step_matches_eager_in_float64():
    """--compile with inductor's generated code computes the eager step: 6 steps in float64 (where
    no top-k choice flips on roundoff) agree to 1e-8 in every loss term, the parameters and the bank."""
    torch.set_default_dtype(torch.float64)
    try:
        torch._dynamo.reset()
        eager, tx, C = tiny_run()
        compiled, _, _ = tiny_run("--compile")
        for step in range(6):
            ids = torch.arange(step * 16, step * 16 + 32) % 90
            a, b = (tiny_step(run, tx, C, ids, step) for run in (eager, compiled))
            for k in a:
                assert torch.allclose(a[k], b[k], rtol=1e-8, atol=1e-9), (step, k)
        for (k, v), w in zip(eager.net.state_dict().items(), compiled.net.state_dict().values()):
            assert torch.allclose(v, w, rtol=1e-8, atol=1e-9), k
        assert torch.allclose(eager.bank.feats, compiled.bank.feats, rtol=1e-8, atol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)
        torch._dynamo.reset()


# ---------------- the multi-process and large-data paths (CPU stand-ins for a GPU cluster) ----------------
def two_processes(tmp_path, *args, driver=None, timeout=240):
    """Two gloo processes of osessl (or of a driver script that calls osessl.main), launched as torchrun
    would (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, ...). Returns [(returncode, stdout, stderr)] per rank;
    a hang fails the test at `timeout`."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = driver or os.path.join(HERE, "osessl.py")
    procs = [subprocess.Popen([sys.executable, script, *args], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"two processes still running after {timeout} s: a hang")


def test_knn_memory_reads_the_split_in_place(tmp_path, monkeypatch):
    """The in-training k-NN memory is the training split itself when every image is in use (no copy:
    on ImageNet-100 a copy is another 19 GB beside what --data-on budgets); with --train-limit it reads
    the images in use a chunk at a time, and gives what an explicit subset gives."""
    splits, evals = record(monkeypatch, "build_run"), record(monkeypatch, "evaluate")
    O.train(tiny_config(tmp_path / "all", *SMALL, "--epochs", "1"))  # 90 unlabeled + 10 exemplars: all in use
    split = splits[0][0][4]
    (_, train_x, _, _, _, memory), _, _ = evals[0]
    assert memory is None and train_x.untyped_storage().data_ptr() == split.untyped_storage().data_ptr()
    O.train(tiny_config(tmp_path / "some", "--epochs", "1", "--train-limit", "64"))
    (run, train_x, train_y, test_x, test_y, memory), _, report = evals[1]
    assert len(memory) == 64 + 10
    assert train_x.untyped_storage().data_ptr() == splits[1][0][4].untyped_storage().data_ptr()
    subset = O.evaluate(run, train_x[memory], train_y[memory], test_x, test_y)
    assert subset == report


def test_two_processes_decode_an_imagefolder_once(tmp_path):
    """On one node, local rank 0 decodes an uncached ImageFolder and writes the cache; the other process
    waits and reads it (8 processes no longer decode 8 copies at once)."""
    write_imagefolder(tmp_path / "folder", classes=("a", "b", "c"), per_class=12)
    driver = tmp_path / "count_decodes.py"
    driver.write_text(f"""import sys, time
sys.path.insert(0, {HERE!r})
import osessl as O
real, calls = O.decode_image, []
O.decode_image = lambda *a, **k: calls.append(time.sleep(0.05)) or real(*a, **k)  # slow: both would overlap
O.main(sys.argv[1:])
print(f"decoded {{len(calls)}} images")
""")
    results = two_processes(tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"),
                            "--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--batch-size", "4",
                            "--bank-size", "16", "--k", "2", "--epochs", "1", "--max-steps", "1", "--eval-every", "0",
                            "--out", str(tmp_path / "run"), driver=str(driver))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert [out.splitlines()[-1] for _, out, _ in results] == ["decoded 72 images", "decoded 0 images"]
    said = "".join(out for _, out, _ in results)
    for split in ("train", "test"):
        assert said.count(f"decoding {tmp_path / 'folder' / split} ") == 1, said
        assert (tmp_path / "folder" / f".osessl-cache-{split}.pt").exists()
    assert f"decoding {tmp_path / 'folder' / 'train'} " in results[0][1]  # by local rank 0


def test_two_processes_download_cifar_once(tmp_path, monkeypatch):
    """Under torchrun, rank 0 downloads CIFAR while the other process waits, then finds the files (two
    processes no longer write one archive at once); a failed download stops both in one line. (One node:
    the turn of the other nodes' first processes is not exercised.)"""
    driver = tmp_path / "count_downloads.py"
    driver.write_text(f"""import os, sys, time
import numpy as np, torchvision
sys.path.insert(0, {HERE!r})
import osessl as O

class Cifar:  # a stand-in for torchvision's: 'downloads' (slowly, both would overlap) when its file is missing
    def __init__(self, root, train=True, download=False):
        done = os.path.join(root, "archive")
        if not os.path.exists(done):
            if os.environ.get("OFFLINE"):
                raise OSError("network unreachable")
            time.sleep(0.5)
            os.makedirs(root, exist_ok=True)
            open(done, "w").close()
            print("downloaded", flush=True)
        n = 100 if train else 20
        self.data = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets, self.classes = [i % 10 for i in range(n)], [str(c) for c in range(10)]
torchvision.datasets.CIFAR10 = Cifar
O.main(sys.argv[1:])
""")
    args = ["--dataset", "cifar10", "--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--batch-size", "4",
            "--bank-size", "16", "--k", "2", "--epochs", "1", "--max-steps", "1", "--eval-every", "0"]
    results = two_processes(tmp_path, *args, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                            driver=str(driver))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert ["downloaded" in out for _, out, _ in results] == [True, False]
    monkeypatch.setenv("OFFLINE", "1")
    results = two_processes(tmp_path, *args, "--data-dir", str(tmp_path / "none"), driver=str(driver), timeout=120)
    for code, _, err in results:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    assert "could not download cifar10" in results[0][2] and "see the failing process's error" in results[1][2]
    assert not (tmp_path / "none").exists()


def test_two_processes_name_one_run_folder_and_save_their_mean_partial_sums(tmp_path):
    """The default run folder is named from one clock for every process (process 1's clock here runs an
    hour ahead), and a run stopped mid-epoch saves the loss sums averaged over the processes (what one
    process with the global batch saves, float64), so that a resumed epoch's means are every process's."""
    driver = tmp_path / "clocks.py"
    driver.write_text(f"""import os, sys, time
sys.path.insert(0, {HERE!r})
import osessl as O
if os.environ["RANK"] == "1":  # this process's clock an hour ahead
    real_time, real_strftime = time.time, time.strftime
    time.time = lambda: real_time() + 3600
    time.strftime = lambda f, t=None: real_strftime(f, time.localtime(time.time()) if t is None else t)
real = O.prepare_run_dir
def spy(*a):
    out = real(*a)
    print("run dir", out, flush=True)
    return out
O.prepare_run_dir = spy
O.main(sys.argv[1:])
""")
    args = TINY + SMALL + ["--float64", "--max-steps", "1"]
    results = two_processes(tmp_path, *args, "--batch-size", "16", driver=str(driver))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    named = [next(line for line in out.splitlines() if line.startswith("run dir")) for _, out, _ in results]
    assert named[0] == named[1], named
    (two,) = (tmp_path / "runs").iterdir()
    r = run_cli(*args, "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr[-2000:]
    sums = [torch.load(d / "last.pt", weights_only=True)["sums"] for d in (two, tmp_path / "one")]
    assert sums[0].keys() == sums[1].keys() and len(sums[0]) > 3
    for k, v in sums[1].items():
        assert torch.allclose(sums[0][k], v, rtol=1e-9, atol=1e-12), (k, sums[0][k], v)


def test_an_unreadable_image_stops_both_processes_in_one_line(tmp_path):
    """Local rank 0 finds the unreadable image while the other process waits: both exit 2 in one line,
    neither waits for the other."""
    write_imagefolder(tmp_path / "folder")
    (tmp_path / "folder" / "train" / "b" / "2.png").write_bytes(b"not an image")
    for code, _, err in two_processes(tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"),
                                      timeout=120):
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
        assert "unreadable image" in err or "not decoded, see the failing process's error" in err


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    """A NaN loss on process 1 only, at the last step of an epoch (so that process 0's own terms are still
    finite there): both processes stop at that check with the diagnosis and exit 3 (process 0 does not
    wait in the next collective for a process that has gone), and the last good checkpoint is intact."""
    driver = tmp_path / "nan_on_rank_1.py"
    driver.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import osessl as O
real, calls = O.dispersion_loss, []
def breaks_at_step_5_on_rank_1(*a, **k):
    calls.append(1)
    return real(*a, **k) * (float("nan") if os.environ["RANK"] == "1" and len(calls) == 6 else 1)
O.dispersion_loss = breaks_at_step_5_on_rank_1
O.main(sys.argv[1:])
""")
    args = TINY + SMALL + ["--epochs", "4", "--batch-size", "16", "--out", str(tmp_path / "run")]
    results = two_processes(tmp_path, *args, driver=str(driver), timeout=180)
    for code, _, err in results:
        assert code == 3, err[-2000:]
        assert "non-finite loss at step 5 (disp, loss)" in err and "Traceback" not in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 4  # end of epoch 2, intact
    assert len(metrics(tmp_path / "run")) == 2


def test_resume_keeps_the_global_batch_it_was_trained_with(tmp_path, capsys):
    """A checkpoint records its world size and global batch. Resuming under another global batch would
    silently change the learning rate, the steps per epoch and the schedules: refused in one line that
    says how to resume; another number of processes with the same global batch continues, said."""
    out = O.train(O.parse_config(TINY + SMALL + ["--epochs", "4", "--max-steps", "2", "--out", str(tmp_path / "a")]))
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert (ck["world_size"], ck["global_batch"]) == (1, 32)
    two = tmp_path / "b" / "last.pt"  # as 2 processes x 16 would have written it
    two.parent.mkdir()
    torch.save(dict(ck, world_size=2, global_batch=32, config=dict(ck["config"], batch_size=16)), two)
    err = one_line_exit_2(O.main, ["--resume", str(two)], capsys)
    assert "trained with a global batch of 32 (2 process(es) x --batch-size 16), this run's is 16 (1 x 16)" in err
    assert "resume it on 2 process(es) with its --batch-size, or give --batch-size 32 for the same global batch" in err
    assert sorted(os.listdir(two.parent)) == ["last.pt"]
    O.train(O.parse_config(["--resume", str(two), "--batch-size", "32", "--max-steps", "3"]))
    assert "continuing on 1 x 32, the same global batch 32" in capsys.readouterr().out
    assert torch.load(two, weights_only=True)["step"] == 3


def test_resa_mode_is_not_held_to_memory_bank_settings(tmp_path):
    """ReSA (lambda = mu = 0) keeps no memory bank: --k and the global batch are not checked against
    --bank-size, and a one-class dataset is fine (no discriminative score)."""
    resa = ["--lambda-proto", "0", "--mu-mix", "0", "--max-steps", "1", "--eval-every", "0"]
    O.train(O.parse_config(TINY + SMALL + resa + ["--k", "500", "--bank-size", "8", "--out", str(tmp_path / "a")]))
    O.train(O.parse_config(TINY + resa + ["--synthetic-classes", "1", "--out", str(tmp_path / "b")]))
    with pytest.raises(O.UsageError, match="larger than the memory bank"):
        O.parse_config(TINY + ["--k", "500", "--bank-size", "8"])


def out_of_range(f):
    """A value just outside a Config field's limits."""
    m = f.metadata
    if m["at_least"] is not None:
        return m["at_least"] - 1
    return m["above"] if m["above"] is not None else m["at_most"] + 1


def test_every_count_and_size_flag_refuses_what_it_cannot_take(tmp_path, capsys):
    """Every bounded setting (sizes, counts, temperatures, weights, seeds) gets the one-line refusal,
    exit 2, for a value outside its limits, and for a float, inf and nan."""
    bounded = [f for f in O.fields(O.Config) if f.metadata["at_least"] is not None or f.metadata["above"] is not None]
    names = {f.name for f in bounded}
    assert {"proj_dim", "proj_hidden", "synthetic_classes", "synthetic_per_class", "width", "batch_size", "k",
            "bank_size", "epochs", "seed", "exemplar_seed", "train_limit", "test_limit", "sinkhorn_iters"} <= names
    for f in bounded:
        flag = "--" + f.name.replace("_", "-")
        for value in [out_of_range(f)] + (["inf", "nan"] if f.type == "float" else []):
            err = one_line_exit_2(O.main, TINY + [flag, str(value), "--out", str(tmp_path / "never")], capsys)
            assert err.startswith(f"error: {flag} must be "), err
    for argv in (["--batch-size", "1"], ["--image-size", "4"], ["--seed", str(2 ** 40)],
                 ["--proj-hidden", str(10 ** 14)]):  # an impossible size: out of memory, said in one line
        one_line_exit_2(O.main, TINY + argv + ["--out", str(tmp_path / "never")], capsys)
    assert not (tmp_path / "never").exists()


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    """A CIFAR download that fails (offline) removes what it created, and only that: the folders it made,
    or the new files in a folder that was there (a user's file in it stays)."""
    import torchvision

    def offline(root, **k):
        os.makedirs(root, exist_ok=True)
        open(os.path.join(root, "cifar-100-python.tar.gz"), "wb").write(b"half")  # as an interrupted download
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    for data_dir in (tmp_path / "new" / "data", tmp_path / "mine"):
        with pytest.raises(O.UsageError, match="could not download cifar100"):
            O.load_data(O.parse_config(["--dataset", "cifar100", "--data-dir", str(data_dir)]))
        (tmp_path / "mine").mkdir(exist_ok=True)
        (tmp_path / "mine" / "notes.txt").write_text("the user's")
    assert sorted(os.listdir(tmp_path)) == ["mine"] and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_a_mismatched_resume_is_refused_before_decoding(tmp_path, capsys):
    """--resume on another ImageFolder (other classes) is refused before a pixel is decoded: no cache is
    written into the data folder; the same folder resumes."""
    write_imagefolder(tmp_path / "two")
    write_imagefolder(tmp_path / "three", classes=("a", "b", "c"))
    args = ["--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--batch-size", "2", "--bank-size", "4", "--k",
            "1", "--epochs", "2", "--max-steps", "1", "--eval-every", "0"]
    out = O.train(O.parse_config(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "two"), *args,
                                  "--out", str(tmp_path / "run")]))
    err = one_line_exit_2(O.main, ["--resume", os.path.join(out, "last.pt"), "--data-dir", str(tmp_path / "three")],
                          capsys)
    assert "with 2 classes, not imagefolder with 3" in err
    assert not [n for n in os.listdir(tmp_path / "three") if n.startswith(".osessl-cache")]


def test_unreadable_images_are_reported_all_at_once(tmp_path):
    write_imagefolder(tmp_path, per_class=4)
    for name in ("a/1.png", "a/3.png", "b/0.png", "b/2.png"):
        (tmp_path / "train" / name).write_bytes(b"not an image")
    with pytest.raises(O.UsageError) as e:
        O.load_imagefolder_split(str(tmp_path), "train")
    message = str(e.value)
    assert message.startswith(f"4 unreadable image(s) in {tmp_path / 'train'}: ") and "\n" not in message
    assert all(os.path.join("a", n) in message for n in ("1.png", "3.png")) and ", ..." in message
    assert not (tmp_path / ".osessl-cache-train.pt").exists()
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not an image either")  # the one that set the size
    with pytest.raises(O.UsageError, match=r"^5 unreadable image\(s\)"):
        O.load_imagefolder_split(str(tmp_path), "train")


# ---------------- osessl_loss: the whole objective as a function of tensors ----------------
def loss_inputs(B=6, Bg=12, C=4, K=16, d=5, e=7, first_row=6):
    """Random float64 inputs of osessl_loss for process 1 of 2 (its rows 6..11 of a global batch of 12)."""
    g = torch.Generator().manual_seed(3)
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u = lambda *s: F.normalize(n(*s), dim=-1)
    z_weak_m, z_strong_m, h_weak_m = u(Bg, d), u(Bg, d), n(Bg, e)
    mine = slice(first_row, first_row + B)  # the online views of this process's images: near their momentum twins
    return dict(z_weak=F.normalize(z_weak_m[mine] + 0.3 * n(B, d), dim=-1).requires_grad_(),
                z_strong=F.normalize(z_strong_m[mine] + 0.3 * n(B, d), dim=-1).requires_grad_(),
                h_weak=(h_weak_m[mine] + 0.3 * n(B, e)).requires_grad_(), z_weak_m=z_weak_m, z_strong_m=z_strong_m,
                h_weak_m=h_weak_m, z_ex=u(C, d).requires_grad_(), bank=u(K, d), bank_valid=torch.arange(K) < 12,
                z_mix=u(B, d).requires_grad_(), beta=torch.rand(B, generator=g, dtype=torch.float64),
                partner=torch.randperm(Bg, generator=g)[:B], first_row=first_row)


def test_osessl_loss_is_the_papers_sum_of_its_terms():
    """METHOD.md sections 3-7 wired by hand from the term functions: A from the detached backbone
    features, p'_v against sg(c) at tau_t, this process's rows of the global targets, the weak view of i
    mixed with the strong view of its partner: osessl_loss gives L = L_resa + lambda (L_align + L_disp)
    + mu (L_mix_proto + L_mix_ins), its terms, and no gradient to the momentum side."""
    x, lam, mu, rows = loss_inputs(), 0.7, 0.3, slice(6, 12)
    A = O.sinkhorn(F.normalize(x["h_weak"].detach(), dim=-1) @ F.normalize(x["h_weak_m"], dim=-1).T, 0.05, 3)
    c, nbr, _ = O.build_prototypes(x["z_ex"], x["bank"], x["bank_valid"], 3, 0.6, 0.5)
    p1, p2 = O.assign(x["z_weak_m"], c.detach(), 0.04), O.assign(x["z_strong_m"], c.detach(), 0.04)
    terms = dict(resa=O.resa_loss(x["z_weak"], x["z_strong"], x["z_weak_m"], x["z_strong_m"], A, 0.4),
                 align=O.align_loss(x["z_weak"], x["z_strong"], c, p1[rows], p2[rows], 0.1),
                 disp=O.dispersion_loss(c, 0.1, "logsumexp"),
                 mix_proto=O.mix_proto_loss(x["z_mix"], c.detach(), O.interpolation_targets(x["beta"], p1[rows],
                                                                                          p2[x["partner"]]), 0.1),
                 mix_ins=O.mix_instance_loss(x["z_mix"], torch.cat([x["z_weak_m"], x["z_strong_m"]]),
                                             O.instance_mix_target(x["beta"], torch.arange(6, 12), x["partner"], 12)))
    by_hand = terms["resa"] + lam * (terms["align"] + terms["disp"]) + mu * (terms["mix_proto"] + terms["mix_ins"])
    alone = lambda col: None  # the other process's column sums: none here (A above is this process's alone)
    loss, got, got_nbr = O.osessl_loss(**x, lambda_proto=lam, mu_mix=mu, k=3, alpha=0.6, tau_w=0.5,
                                       dispersion="logsumexp", all_reduce=alone)
    assert torch.allclose(loss, by_hand, rtol=1e-12) and torch.equal(got_nbr, nbr)
    for name, value in terms.items():
        assert torch.allclose(got[name], value, rtol=1e-12), name
    assert not got["loss"].requires_grad
    momentum = {name: x[name].clone().requires_grad_() for name in ("z_weak_m", "z_strong_m", "h_weak_m")}
    O.osessl_loss(**{**x, **momentum}, lambda_proto=lam, mu_mix=mu, k=3, all_reduce=alone)[0].backward()
    assert all(t.grad is None for t in momentum.values())  # sg: the momentum network learns only by EMA
    assert x["h_weak"].grad is None  # h_weak only makes ReSA's target
    assert all(x[name].grad.abs().sum() > 0 for name in ("z_weak", "z_strong", "z_ex", "z_mix"))
    resa_only, resa_terms, none = O.osessl_loss(**{n: x[n] for n in list(x)[:6]}, first_row=6, all_reduce=alone)
    assert none is None and set(resa_terms) == {"resa", "loss"} and torch.allclose(resa_only, terms["resa"])
    with pytest.raises(ValueError, match="give this process's first_row, and all_reduce"):  # DDP use, half wired
        O.osessl_loss(**{n: x[n] for n in list(x)[:6]})
    with pytest.raises(ValueError, match="give z_ex with z_mix"):
        O.osessl_loss(**{n: x[n] for n in list(x)[:6]}, z_mix=x["z_mix"], first_row=6, all_reduce=alone)


def test_the_step_is_osessl_loss_of_its_own_forwards(monkeypatch):
    """What the training step computes is osessl_loss of the embeddings forwarded here by hand, wired as
    the paper says (defaults: the exemplars in one BatchNorm batch with the weak views, chosen by the
    momentum network's embeddings; the mixed image is weak view of i, strong view of its partner)."""
    import copy
    run, tx, C = tiny_run()
    for step in range(3):  # fill the bank
        tiny_step(run, tx, C, torch.arange(step * 32, step * 32 + 32), step)
    ids = torch.arange(40, 72)
    rnd, x1, x2, xm, xe = step_inputs(run, tx, C, ids, step=3)
    momentum, online = copy.deepcopy(run.momentum_net), copy.deepcopy(run.net)
    loss, terms, _ = O.objective(run, x1, x2, ids, rnd)
    with torch.no_grad():
        hm, (zm1, zm2) = momentum(torch.cat([x1, xe]), x2)
        h, (z1, z2, zmix) = online(torch.cat([x1, xe]), x2, xm)
    cfg = run.cfg
    again, again_terms, _ = O.osessl_loss(
        z1[:32], z2, h[:32], zm1[:32], zm2, hm[:32], z_ex=z1[32:], bank=run.bank.feats, bank_valid=run.bank.valid(),
        select_by=zm1[32:], z_mix=zmix, beta=rnd.beta, partner=rnd.partner, lambda_proto=cfg.lambda_proto,
        mu_mix=cfg.mu_mix, k=cfg.k, alpha=cfg.alpha, tau_w=cfg.tau_w, tau_s=cfg.tau_s, tau_t=cfg.tau_t)
    assert torch.allclose(loss, again, rtol=1e-5)
    for name, value in again_terms.items():
        assert torch.allclose(terms[name], value, rtol=1e-5, atol=1e-6), name


def readme_example():
    import re
    text = open(os.path.join(HERE, "README.md")).read()
    section = text.split("## Use it in your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_example_runs_and_gives_the_same_L_in_a_process_group(tmp_path):
    """README's "Use it in your own code" block, as it stands: at most 30 lines, needs only torch and
    osessl.py beside it, and prints the same L alone and in a gloo process group, where the two processes
    hold different batches (seed + rank): osessl_loss reduces over processes only when asked, so one
    process's Sinkhorn never sums the other's columns into its own."""
    code = readme_example()
    assert len(code.strip().splitlines()) <= 30
    import shutil
    shutil.copy(os.path.join(HERE, "osessl.py"), tmp_path)
    (tmp_path / "example.py").write_text(code)
    (tmp_path / "run_it.py").write_text(
        "import os, torch, torch.distributed as dist\n"
        "shift, seed = int(os.environ.get('RANK', os.environ.get('SHIFT', '0'))), torch.manual_seed\n"
        "torch.manual_seed = lambda s: seed(s + shift)  # another batch on each process\n"
        "if 'RANK' in os.environ:\n    dist.init_process_group('gloo')\n"
        "exec(open('example.py').read())\n")
    alone = []
    for shift in ("0", "1"):
        r = subprocess.run([sys.executable, "run_it.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1", SHIFT=shift))  # as two_processes: same roundoff
        assert r.returncode == 0 and r.stdout.count("L = ") == 3, r.stderr
        alone.append(r.stdout)
    assert alone[0] != alone[1]
    for (code, out, err), expected in zip(two_processes(tmp_path, driver=str(tmp_path / "run_it.py"), timeout=120),
                                          alone):
        assert code == 0, err
        assert out == expected


# ---------------- a newcomer's first hour: errors that name the fix, small things ----------------
def test_resume_names_an_architecture_setting_that_differs(tmp_path, capsys):
    """Resuming with another --width (or any setting that fixes a saved tensor's size) names the setting
    and both values instead of a state_dict size mismatch; the checkpoint is untouched."""
    out = O.train(tiny_config(tmp_path, "--max-steps", "1"))
    last = os.path.join(out, "last.pt")
    before = open(last, "rb").read()
    for flag, value, saved in (("--width", "16", "8"), ("--proj-dim", "16", "32"), ("--bank-size", "256", "128"),
                               ("--select-space", "encoding", "embedding"), ("--arch", "resnet50", "resnet18")):
        err = one_line_exit_2(O.main, ["--resume", last, flag, value], capsys)
        assert f"has {flag} {saved}, this run {flag} {value}: drop {flag} or set it to {saved}" in err, err
    assert open(last, "rb").read() == before
    ck = O.read_checkpoint(last)  # a checkpoint from before --select-space existed ran the default, embedding
    torch.save(dict(ck, config={k: v for k, v in ck["config"].items() if k != "select_space"}), tmp_path / "old.pt")
    err = one_line_exit_2(O.main, ["--resume", str(tmp_path / "old.pt"), "--select-space", "encoding"], capsys)
    assert "has --select-space embedding, this run --select-space encoding" in err, err
    assert json.load(open(os.path.join(out, "config.json")))["out"] == out  # the folder used, not ""


def test_a_run_folder_given_as_checkpoint_names_the_file(tmp_path, capsys):
    """... and knn_eval's flags that do not go together are refused in one line each, before any work."""
    out = O.train(tiny_config(tmp_path, "--max-steps", "1"))
    for fn, argv in ((knn_eval.main, ["--checkpoint", out]), (O.main, ["--resume", out])):
        err = one_line_exit_2(fn, argv, capsys)
        assert "is a folder, not a checkpoint" in err and os.path.join(out, "last.pt") in err, err
    last = ["--checkpoint", os.path.join(out, "last.pt")]
    for argv, says in ((["--image-size", "64"], "--image-size is for --transfer"),
                       (["--transfer", str(tmp_path), "--data-dir", "x"], "leave out --dataset and --data-dir"),
                       (["--transfer", str(tmp_path), "--finetune", "0.1"], "not both"),
                       (["--finetune", "2"], "--finetune is a fraction"),
                       (["--finetune", "0.1", "--linear"], "leave out --linear and --train-limit"),
                       (["--finetune-epochs", "5"], "give it too")):
        assert says in one_line_exit_2(knn_eval.main, last + argv, capsys)
    assert sorted(os.listdir(out)) == ["config.json", "last.pt"]  # no eval*.json written


def test_plot_without_matplotlib_fails_before_the_table(tmp_path, capsys, monkeypatch):
    out = O.train(tiny_config(tmp_path, "--eval-every", "0"))
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as e:
        knn_eval.main(["--summarize", out, "--plot", str(tmp_path / "p.png")])
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == "" and "--plot needs matplotlib" in captured.err


def test_eval_json_is_rounded_and_the_oracle_is_a_labelled_reference(tmp_path, capsys):
    """eval.json holds two decimals; the nearest-class-mean oracle, which reads every training label, is
    printed and saved as a reference (never among the protocols that --summarize compares), in h and z;
    the printed table is aligned."""
    out = O.train(tiny_config(tmp_path, "--eval-every", "0"))
    capsys.readouterr()
    knn_eval.main(["--checkpoint", os.path.join(out, "last.pt")])
    text = capsys.readouterr().out
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert {"oracle_ncm_h", "oracle_ncm_z"} <= set(ev) and not set(knn_eval.REFERENCES) & set(knn_eval.PROTOCOLS)
    assert all(round(v, 2) == v for k, v in ev.items() if k in knn_eval.PROTOCOLS or k in knn_eval.REFERENCES)
    rows = [line for line in text.splitlines() if line.rstrip().endswith(tuple("0123456789")) and "%" not in line
            and ("protocol" in line or any(name in line for name in {**knn_eval.PROTOCOLS, **knn_eval.REFERENCES}
                                           .values()))]
    assert len(rows) == 7 and len({len(r) for r in rows}) == 1, rows  # 5 protocols + 2 references, one width


def test_nearest_class_mean_reads_the_class_means():
    """Each test point goes to the class whose mean training direction is the closest (cosine): here the
    class means are the two axes, and a point nearer one axis takes its class."""
    train_f = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_f, test_y = torch.tensor([[2.0, 0.5], [0.3, 1.0], [1.0, 0.9]]), torch.tensor([0, 1, 1])
    assert knn_eval.nearest_class_mean(train_f, train_y, test_f, test_y, 2) == pytest.approx(200 / 3)


def test_notebook_setup_reads_paths_from_where_the_user_stands(tmp_path):
    """notebooks/common.py: a relative OSESSL_CHECKPOINT is read from the user's folder ($PWD, kept by
    Jupyter), not from notebooks/; a missing one is one line naming OSESSL_CHECKPOINT and the recipe."""
    O.train(O.parse_config(TINY + ["--epochs", "1", "--eval-every", "0", "--out", str(tmp_path / "runs" / "a")]))
    env = dict(os.environ, PWD=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("OSESSL_FAST", None)
    setup = lambda checkpoint: subprocess.run(
        [sys.executable, "-c", "import common; print(common.describe_run())"], cwd=os.path.join(HERE, "notebooks"),
        env=dict(env, OSESSL_CHECKPOINT=checkpoint), capture_output=True, text=True, timeout=300)
    found = setup(os.path.join("runs", "a", "last.pt"))
    assert found.returncode == 0, found.stderr[-2000:]
    assert f"checkpoint {tmp_path}/runs/a/last.pt: step 9 (epoch 1 of 1), synthetic" in found.stdout
    missing = setup(os.path.join("runs", "b", "last.pt"))
    err = missing.stderr.strip()
    assert missing.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"no checkpoint at {tmp_path / 'runs' / 'b' / 'last.pt'}: set OSESSL_CHECKPOINT" in err
    assert "--keep-every 3" in err and "--out runs/cpu-recipe/osessl-s0" in err
    # a run that chose in backbone features: the notebooks load its bank, say so, and follow its own choice
    O.train(O.parse_config(TINY + ["--epochs", "1", "--eval-every", "0", "--select-space", "encoding",
                                   "--out", str(tmp_path / "runs" / "e")]))
    check = """import common as c, torch
b, idx = c.trained_neighbours(c.ck)
h = c.O.extract_features(c.momentum.encoder, c.train_x[c.ex_idx], c.mean, c.std)
by_hand = c.O.discriminative_scores(b.select, c.F.normalize(h, dim=1), c.cfg.alpha)
by_hand = by_hand.masked_fill(~b.valid()[None], float('-inf')).topk(c.cfg.k, 1).indices
print(c.describe_run(), torch.equal(idx, by_hand), sorted(c.headroom(c.ck)))"""
    encoding_run = dict(env, OSESSL_CHECKPOINT=str(tmp_path / "runs" / "e" / "last.pt"))
    done = subprocess.run([sys.executable, "-c", check], cwd=os.path.join(HERE, "notebooks"), capture_output=True,
                          text=True, timeout=300, env=encoding_run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(--select-space encoding)" in done.stdout and " True [" in done.stdout and "'precision h'" in done.stdout


def test_transfer_knn_on_another_imagefolder(tmp_path, capsys):
    """knn_eval.py --transfer: the checkpoint's momentum encoder on another ImageFolder with its own classes
    (its train/ as memory, its test/ as queries), into its own eval-transfer-<name>.json (eval.json is not
    touched), the k-NN protocols named as transfer, the paper's k-NN(20) among them, no one-shot row; it
    equals k-NN on those images' features computed here by hand."""
    out = O.train(tiny_config(tmp_path, "--eval-every", "0"))
    write_imagefolder(tmp_path / "other", classes=("p", "q", "r"), per_class=4)
    knn_eval.main(["--checkpoint", os.path.join(out, "last.pt")])
    before = open(os.path.join(out, "eval.json")).read()
    capsys.readouterr()
    res = knn_eval.main(["--checkpoint", os.path.join(out, "last.pt"), "--transfer", str(tmp_path / "other")])
    text = capsys.readouterr().out
    assert open(os.path.join(out, "eval.json")).read() == before
    saved = json.load(open(os.path.join(out, "eval-transfer-other.json")))
    assert set(res) == {"knn5", "knn20_cos", "knn200_cos"} and all(saved[k] == v for k, v in res.items())
    assert "transfer to other: weighted cosine 20-NN" in text and "the paper's k-NN(20)" in text
    assert saved["train_images"] == saved["test_images"] == 12
    ck = O.read_checkpoint(os.path.join(out, "last.pt"))
    net = O.Network(8, 64, 32)
    net.load_state_dict(ck["momentum"])
    tx, ty, _ = O.load_imagefolder_split(str(tmp_path / "other"), "train")
    vx, vy, _ = O.load_imagefolder_split(str(tmp_path / "other"), "test")
    mean, std = O.channel_stats(tx)
    f, g = (O.extract_features(net.encoder, x, mean, std) for x in (tx, vx))
    assert res["knn20_cos"] == round(O.knn_accuracy(f, ty, g, vy, 3, k=20, cosine=True), 2)


def test_finetuning_learns_from_the_labeled_fraction_only(tmp_path, capsys):
    """Semi-supervised fine-tuning (knn_eval.py --finetune): the labeled set is a seeded, class-balanced
    fraction (round(f x n_c) of each class); fine-tuning every weight from the labels reaches a high top-1
    on class-structured images, and the same run on shuffled labels stays near chance (10%); the command
    writes its own eval-finetune-<percent>.json and leaves the checkpoint as it was."""
    y = torch.arange(100) % 4
    picked = knn_eval.balanced_fraction(y, 0.1, seed=0)
    assert torch.bincount(y[picked]).tolist() == [2, 2, 2, 2] and torch.equal(picked, knn_eval.balanced_fraction(
        y, 0.1, seed=0)) and not torch.equal(picked, knn_eval.balanced_fraction(y, 0.1, seed=1))
    assert len(knn_eval.balanced_fraction(y, 0.001, seed=0)) == 4  # at least one image per class
    tx, ty, vx, vy, C = O.make_synthetic(10, 32, seed=0)
    mean, std = O.channel_stats(tx)
    accuracy = {}
    for name, labels in (("true", ty), ("shuffled", ty[torch.randperm(len(ty), generator=torch.Generator()
                                                                        .manual_seed(1))])):
        torch.manual_seed(0)
        accuracy[name] = knn_eval.finetune(O.ResNet(8), tx, labels, vx, vy, C, mean, std, epochs=15, batch_size=32)
    assert accuracy["true"] > 60 and accuracy["shuffled"] < 25, accuracy
    out = O.train(tiny_config(tmp_path, "--eval-every", "0"))
    before = open(os.path.join(out, "last.pt"), "rb").read()
    res = knn_eval.main(["--checkpoint", os.path.join(out, "last.pt"), "--finetune", "0.1", "--finetune-epochs", "2"])
    saved = json.load(open(os.path.join(out, "eval-finetune-10pct.json")))
    assert saved["finetune"] == res["finetune"] and saved["labeled_images"] == 30 and saved["epochs"] == 2
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
