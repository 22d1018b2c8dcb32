"""Distillation losses against independent, explicit computations (see shared METHOD.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import BKDConfig, LogitsConfig, StudentConfig
from pipeline.errors import BkdError
from pipeline.student.losses import BKDHead, DistillationLoss, FeatureRegression, bkd_form, kd_loss, wsld_loss

# ---------------------------------------------------------------------------------------------
# BKD head
# ---------------------------------------------------------------------------------------------


def _fixed_mask(shape, seed=123, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(shape, generator=g) < keep).float()
    assert 0 < mask.sum() < mask.numel()  # a real mask: some channels kept, some dropped
    return mask


def _pooled_reference(head: BKDHead, f_s, f_t, mask, alpha, rescale):
    """a = f_s W_a^T + b_a ; b = M a ; g = W2 relu(W1 b + b1) + b2 ; alpha * sum((g - f_t')^2) / N."""
    f_s = f_s.detach().double()
    f_t = f_t.detach().double()
    if isinstance(head.align, nn.Linear):
        a = f_s @ head.align.weight.detach().double().T + head.align.bias.detach().double()
    else:
        a = f_s
    b = mask.double() * a
    w1, b1 = head.generation[0].weight.detach().double(), head.generation[0].bias.detach().double()
    w2, b2 = head.generation[2].weight.detach().double(), head.generation[2].bias.detach().double()
    h = b @ w1.T + b1
    h = torch.where(h > 0, h, torch.zeros_like(h))
    g = h @ w2.T + b2
    target = f_t / f_t.max() * a.max() if rescale else f_t
    return alpha * ((g - target) ** 2).sum() / f_s.shape[0]


@pytest.mark.parametrize("student_dim,teacher_dim", [(6, 10), (10, 10)])
@pytest.mark.parametrize("rescale", [True, False])
def test_bkd_pooled_matches_explicit_formula(student_dim, teacher_dim, rescale):
    torch.manual_seed(0)
    n, alpha = 5, 0.37
    head = BKDHead(student_dim, teacher_dim, blur_ratio=0.15, alpha=alpha, rescale=rescale)
    if student_dim != teacher_dim:
        assert isinstance(head.align, nn.Linear)
    else:
        assert isinstance(head.align, nn.Identity)
        assert len(list(head.align.parameters())) == 0
    f_s = torch.randn(n, student_dim)
    f_t = torch.rand(n, teacher_dim) * 3 + 0.1  # pre-logits after ReLU+pool are non-negative
    mask = _fixed_mask((n, teacher_dim))

    got = head(f_s, f_t, mask=mask)
    want = _pooled_reference(head, f_s, f_t, mask, alpha, rescale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got.dim() == 0

    # The mask really matters: with all channels kept the value changes.
    other = head(f_s, f_t, mask=torch.ones_like(mask))
    assert not torch.allclose(other, got)


def test_bkd_rescale_changes_target():
    torch.manual_seed(1)
    f_s, f_t = torch.randn(4, 6), torch.rand(4, 8) * 10 + 1
    mask = _fixed_mask((4, 8))
    a = BKDHead(6, 8, rescale=True)
    b = BKDHead(6, 8, rescale=False)
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(f_s, f_t, mask=mask), b(f_s, f_t, mask=mask))


def test_bkd_gradients_reach_head_and_student_not_teacher():
    torch.manual_seed(2)
    head = BKDHead(6, 8, alpha=1.0)
    f_s = torch.randn(4, 6, requires_grad=True)
    f_t = (torch.rand(4, 8) + 0.5).requires_grad_(True)
    loss = head(f_s, f_t, mask=_fixed_mask((4, 8)))
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert f_t.grad is None or torch.count_nonzero(f_t.grad) == 0


def test_bkd_teacher_shape_mismatch_raises():
    head = BKDHead(6, 8)
    with pytest.raises(ValueError):
        head(torch.randn(3, 6), torch.randn(3, 7))


@pytest.mark.parametrize("student_dim,teacher_dim", [(3, 5), (4, 4)])
@pytest.mark.parametrize("rescale", [True, False])
def test_bkd_spatial_matches_explicit_convolutions(student_dim, teacher_dim, rescale):
    torch.manual_seed(3)
    n, h, w, alpha = 3, 4, 5, 0.05
    head = BKDHead(student_dim, teacher_dim, alpha=alpha, rescale=rescale, form="map")
    f_s = torch.randn(n, student_dim, h, w)
    f_t = torch.rand(n, teacher_dim, h, w) + 0.2
    mask = _fixed_mask((n, teacher_dim, 1, 1), seed=7, keep=0.6)

    got = head(f_s, f_t, mask=mask)

    if student_dim != teacher_dim:
        assert isinstance(head.align, nn.Conv2d) and head.align.kernel_size == (1, 1)
        a = F.conv2d(f_s, head.align.weight, head.align.bias)
    else:
        assert isinstance(head.align, nn.Identity)
        a = f_s
    c1, c2 = head.generation[0], head.generation[2]
    assert c1.kernel_size == (3, 3) and c2.kernel_size == (3, 3)
    b = a * mask  # broadcasts over H, W: one decision per sample and channel
    g = F.conv2d(torch.clamp(F.conv2d(b, c1.weight, c1.bias, padding=1), min=0), c2.weight, c2.bias, padding=1)
    target = f_t / f_t.max() * a.max() if rescale else f_t
    want = alpha * ((g - target) ** 2).sum() / n
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Blur mask
# ---------------------------------------------------------------------------------------------


def test_blur_mask_drop_rate_and_shape_pooled():
    torch.manual_seed(4)
    head = BKDHead(8, 8, blur_ratio=0.15)
    aligned = torch.randn(400, 250)
    mask = head.blur_mask(aligned)
    assert mask.shape == (400, 250)
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - 0.15) < 0.01


def test_blur_mask_spatial_is_per_channel():
    torch.manual_seed(5)
    head = BKDHead(4, 4, blur_ratio=0.3, form="map")
    aligned = torch.randn(200, 50, 3, 3)
    mask = head.blur_mask(aligned)
    assert mask.shape == (200, 50, 1, 1)
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.02


def test_blur_in_forward_zeroes_whole_channels_in_spatial_maps():
    torch.manual_seed(6)
    n, c = 16, 8
    head = BKDHead(c, c, blur_ratio=0.5, form="map")  # identity align: a == f_s
    seen = {}
    head.generation[0].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach().clone()))
    f_s = torch.rand(n, c, 4, 4) + 1.0  # strictly non-zero, so a zero means "masked"
    head(f_s, torch.rand(n, c, 4, 4) + 0.1)
    blurred = seen["x"]
    zero = (blurred == 0)
    per_channel = zero.flatten(2)
    # Each (sample, channel) is either wholly zeroed or wholly kept, over all spatial positions.
    assert torch.all(per_channel.all(2) | (~per_channel).all(2))
    kept = ~per_channel.any(2)
    assert torch.equal(blurred[kept], f_s[kept])
    assert 0 < per_channel.all(2).sum() < n * c


def test_blur_mask_is_fresh_on_each_call():
    head = BKDHead(8, 8, blur_ratio=0.15)
    aligned = torch.randn(64, 32)
    first, second = head.blur_mask(aligned), head.blur_mask(aligned)
    assert not torch.equal(first, second)
    # forward draws a fresh mask too: two calls with identical inputs give different losses
    f_t = torch.rand(64, 8) + 0.1
    f_s = torch.randn(64, 8)
    assert head(f_s, f_t).item() != head(f_s, f_t).item()


def test_blur_ratio_zero_keeps_everything():
    head = BKDHead(8, 8, blur_ratio=0.0)
    assert torch.all(head.blur_mask(torch.randn(100, 30)) == 1)
    assert torch.all(head.blur_mask(torch.randn(10, 30, 2, 2)) == 1)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_blur_ratio_outside_unit_interval_refused(ratio):
    with pytest.raises(ValueError, match="blur_ratio"):
        BKDHead(8, 8, blur_ratio=ratio)


# ---------------------------------------------------------------------------------------------
# Logit distillation
# ---------------------------------------------------------------------------------------------


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _np_log_softmax(x):
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def _logits(n=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, k, generator=g) * 2
    z_t = torch.randn(n, k, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return z_s, z_t, y


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kd_loss_matches_explicit_kl(tau):
    z_s, z_t, _ = _logits()
    total = 0.0
    for i in range(len(z_s)):
        p_s = _np_softmax(z_s[i].double().numpy() / tau)
        p_t = _np_softmax(z_t[i].double().numpy() / tau)
        total += sum(p_t[k] * math.log(p_t[k] / p_s[k]) for k in range(len(p_t)))
    want = tau**2 * total / len(z_s)
    got = kd_loss(z_s, z_t, tau)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_kd_loss_zero_for_identical_logits():
    z, _, _ = _logits()
    assert kd_loss(z, z.clone(), 2.0).abs().item() < 1e-6


def _wsld_weights(z_s, z_t, y):
    """w_i = 1 - exp(-max(0, CE_s / (CE_t + 1e-7))), computed with numpy from plain numbers."""
    w = []
    for i in range(len(z_s)):
        ce_s = -_np_log_softmax(z_s[i].detach().double().numpy())[y[i]]
        ce_t = -_np_log_softmax(z_t[i].double().numpy())[y[i]]
        w.append(1.0 - math.exp(-max(0.0, ce_s / (ce_t + 1e-7))))
    return w


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_wsld_loss_matches_explicit_loop(tau):
    z_s, z_t, y = _logits(n=7, k=4, seed=1)
    weights = _wsld_weights(z_s, z_t, y)
    terms = []
    for i in range(len(z_s)):
        p_t = _np_softmax(z_t[i].double().numpy() / tau)
        log_p_s = _np_log_softmax(z_s[i].double().numpy() / tau)
        ce_soft = -sum(p_t[k] * log_p_s[k] for k in range(len(p_t)))
        terms.append(weights[i] * ce_soft)
    want = tau**2 * sum(terms) / len(terms)
    got = wsld_loss(z_s, z_t, y, tau)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_wsld_weight_uses_detached_student_logits():
    tau = 2.0
    z_s, z_t, y = _logits(n=5, k=4, seed=2)
    z_s = z_s.double().requires_grad_(True)
    z_t = z_t.double()

    (grad,) = torch.autograd.grad(wsld_loss(z_s, z_t, y, tau), z_s)

    w_const = torch.tensor(_wsld_weights(z_s, z_t, y), dtype=torch.float64)

    def ce_soft(z):
        return -(F.softmax(z_t / tau, 1) * F.log_softmax(z / tau, 1)).sum(1)

    (want,) = torch.autograd.grad(tau**2 * (w_const * ce_soft(z_s)).mean(), z_s)
    torch.testing.assert_close(grad, want)

    # Had the weight not been detached, the gradient would be different (the test can fail).
    ce_s = F.cross_entropy(z_s, y, reduction="none")
    ce_t = F.cross_entropy(z_t, y, reduction="none")
    w_live = 1 - torch.exp(-torch.clamp(ce_s / (ce_t + 1e-7), min=0))
    (live,) = torch.autograd.grad(tau**2 * (w_live * ce_soft(z_s)).mean(), z_s)
    assert not torch.allclose(live, want)


# ---------------------------------------------------------------------------------------------
# DistillationLoss
# ---------------------------------------------------------------------------------------------

EXPECTED_KEYS = {
    "none": {"ce", "loss"},
    "kd": {"ce", "kd", "loss"},
    "wsld": {"ce", "wsld", "loss"},
    "bkd": {"ce", "bkd", "loss"},
    "mixed": {"ce", "bkd", "wsld", "loss"},
    "kdsnn": {"ce", "kdsnn", "loss"},
    "lasnn": {"ce", "lasnn", "loss"},
}


def _student_cfg(mode, weight=0.7, tau=3.0):
    return StudentConfig(distill=mode, bkd=BKDConfig(blur_ratio=0.2, alpha=0.01, rescale=True),
                         logits=LogitsConfig(temperature=tau, weight=weight))


@pytest.mark.parametrize("mode", sorted(EXPECTED_KEYS))
def test_distillation_loss_terms(mode):
    torch.manual_seed(8)
    n, ds, dt, k = 6, 5, 7, 4
    cfg = _student_cfg(mode)
    crit = DistillationLoss(cfg, [("pre_logits", "pre_logits", (ds,), (dt,))])
    f_s = {"pre_logits": torch.randn(n, ds, requires_grad=True)}
    z_s = torch.randn(n, k, requires_grad=True)
    y = torch.randint(0, k, (n,))
    f_t, z_t = {"pre_logits": torch.rand(n, dt) + 0.1}, torch.randn(n, k)

    if mode == "none":
        assert len(crit.feature_terms) == 0 and crit.teacher_locations == []
        assert len(list(crit.parameters())) == 0
        assert not crit.uses_teacher
        terms = crit({}, z_s, y)  # no teacher needed
    else:
        assert crit.uses_teacher
        terms = crit(f_s, z_s, y, f_t, z_t)

    assert set(terms) == EXPECTED_KEYS[mode]
    parts = [v for key, v in terms.items() if key != "loss"]
    torch.testing.assert_close(terms["loss"], torch.stack(parts).sum())

    # ce is the plain cross-entropy of the student logits
    log_p = z_s.detach().log_softmax(1)
    torch.testing.assert_close(terms["ce"].detach(), -log_p[torch.arange(n), y].mean())
    if "kd" in terms:
        torch.testing.assert_close(terms["kd"], 0.7 * kd_loss(z_s, z_t, 3.0))
    if "wsld" in terms:
        torch.testing.assert_close(terms["wsld"], 0.7 * wsld_loss(z_s, z_t, y, 3.0))

    if mode in ("bkd", "mixed", "kdsnn", "lasnn"):
        (head,) = crit.feature_terms
        assert crit.student_locations == ["pre_logits"] and crit.teacher_locations == ["pre_logits"]
        params = list(crit.parameters())
        assert params and len(params) == len(list(head.parameters()))
        assert head.alpha == 0.01
        assert isinstance(head.align, nn.Linear)  # widths differ
        if mode in ("bkd", "mixed"):
            assert isinstance(head, BKDHead) and head.form == "pooled"
            assert head.blur_ratio == 0.2 and head.rescale
        else:
            assert isinstance(head, FeatureRegression)
        terms["loss"].backward()
        assert all(p.grad is not None for p in params)
    else:
        assert len(crit.feature_terms) == 0
        assert len(list(crit.parameters())) == 0


def test_bkd_form_follows_the_pair_shapes():
    assert bkd_form((384, 8, 8), (384,)) == "cml"
    assert bkd_form((512, 7, 7), (512, 7, 7)) == "map"
    assert bkd_form((128,), (512,)) == "pooled"
    with pytest.raises(BkdError, match="pooled student vector"):
        bkd_form((128,), (512, 7, 7))
    cfg = _student_cfg("mixed")
    crit = DistillationLoss(cfg, [("map", "pre_logits", (6, 4, 4), (8,))])
    assert crit.feature_terms[0].form == "cml" and "map -> pre_logits (BKD cml)" in crit.describe()


def test_lasnn_sums_one_regression_per_pair():
    torch.manual_seed(9)
    cfg = _student_cfg("lasnn")
    pairs = [("a", "x", (3, 4, 4), (5, 4, 4)), ("b", "y", (6, 2, 2), (6, 2, 2))]
    crit = DistillationLoss(cfg, pairs)
    assert len(crit.feature_terms) == 2
    f_s = {"a": torch.randn(2, 3, 4, 4), "b": torch.randn(2, 6, 2, 2)}
    f_t = {"x": torch.randn(2, 5, 4, 4), "y": torch.randn(2, 6, 2, 2)}
    terms = crit(f_s, torch.randn(2, 3), torch.tensor([0, 2]), f_t, torch.randn(2, 3))
    want = crit.feature_terms[0](f_s["a"], f_t["x"]) + crit.feature_terms[1](f_s["b"], f_t["y"])
    torch.testing.assert_close(terms["lasnn"], want)


def test_bkd_rescale_refuses_non_positive_teacher_maximum():
    head = BKDHead(4, 4, blur_ratio=0.0, rescale=True)
    with pytest.raises(BkdError, match="rescale"):
        head(torch.randn(3, 4), -torch.rand(3, 4))
    # Without the rescale the same batch is a plain regression target.
    assert torch.isfinite(BKDHead(4, 4, blur_ratio=0.0, rescale=False)(torch.randn(3, 4), -torch.rand(3, 4)))


# ---------------------------------------------------------------------------------------------
# Top-k logit storage: the logits losses from k stored logits against the full logits
# ---------------------------------------------------------------------------------------------


def _topk_dense(teacher_logits: torch.Tensor, k: int, target_classes: torch.Tensor | None = None) -> torch.Tensor:
    """The dense logits a reader rebuilds from a top-k store of `teacher_logits` (float32 top k)."""
    from pipeline.targets import dense_logits, topk_arrays

    if target_classes is None:
        target_classes = teacher_logits.argmax(1, keepdim=True).repeat(1, 2)
    kept = topk_arrays(teacher_logits.numpy(), k, target_classes.numpy())
    return torch.from_numpy(dense_logits(kept["logits"], kept["logits_index"], teacher_logits.shape[1],
                                         kept["logits_target_class"], kept["logits_target"], kept["logits_tail"]))


def _constant_fill(teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """What readers rebuilt before store format 5: the top k, every other class 100 below the k-th."""
    values, classes = teacher_logits.topk(k, dim=1)
    return torch.full_like(teacher_logits, 0).add(values[:, -1:] - 100).scatter(1, classes, values)


def test_dense_logits_keep_the_topk_and_the_targets_and_stay_below_the_kth():
    z = torch.randn(6, 20)
    targets = torch.randint(0, 20, (6, 2))
    dense = _topk_dense(z, 4, targets)
    values, classes = z.topk(4, dim=1)
    assert torch.equal(dense.gather(1, classes), values) and torch.equal(dense.gather(1, targets), z.gather(1, targets))
    rest = dense.clone().scatter_(1, classes, -float("inf")).scatter_(1, targets, -float("inf"))
    assert (rest.max(1).values <= values[:, -1] + 1e-5).all()
    torch.testing.assert_close(torch.logsumexp(dense, 1), torch.logsumexp(z, 1))
    assert torch.equal(_topk_dense(z, 20), z)  # k = all classes: exact


TOPK_CASES = ("hard", "hard, 1/4 outside top k", "smoothed 0.1", "mixup 0.7")


def _topk_case(case: str, n: int = 64, classes: int = 1000):
    """(teacher logits, WSLD target: labels or a distribution, target classes) of a confident teacher:
    the label ~24 above the rest, 8 runners-up 18 above (for mixup: the mixed image's logits)."""
    torch.manual_seed(0)
    labels = torch.randint(0, classes, (n,))
    partners = labels.roll(1)
    lam = 0.7 if case.startswith("mixup") else 1.0
    onehot = lambda y: F.one_hot(y, classes).float()  # noqa: E731
    boost = 24 * (lam * onehot(labels) + (1 - lam) * onehot(partners))
    if "outside" in case:
        boost[: n // 4] = 0  # the teacher is wrong on these rows: their label far outside its top k
    teacher = torch.randn(n, classes) + boost
    teacher[:, :8] += 18  # a few plausible runner-up classes
    smooth = lambda y: onehot(y) * 0.9 + 0.1 / classes  # noqa: E731
    target = {"smoothed 0.1": smooth(labels), "mixup 0.7": lam * smooth(labels) + (1 - lam) * smooth(partners)}
    return teacher, target.get(case, labels), torch.stack([labels, partners if lam < 1 else labels], 1)


def topk_loss_errors(k: int, case: str) -> dict[str, tuple[float, float]]:
    """{'kd before', 'kd after', 'wsld before', 'wsld after'}: (relative error of the loss, of its
    gradient wrt the student logits) at tau = 2, with the top-k store's logits in place of the full ones;
    before: the constant fill (store format 4), after: the stored statistics (format 5)."""
    teacher, target, classes = _topk_case(case)
    student = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    rebuilt = {"before": _constant_fill(teacher, k), "after": _topk_dense(teacher, k, classes)}
    losses = {"kd": lambda z_t: kd_loss(student, z_t, 2.0), "wsld": lambda z_t: wsld_loss(student, z_t, target, 2.0)}
    out = {}
    for name, loss in losses.items():
        full = loss(teacher)
        g_full, = torch.autograd.grad(full, student)
        for when, z_t in rebuilt.items():
            approx = loss(z_t)
            g, = torch.autograd.grad(approx, student)
            out[f"{name} {when}"] = (abs(approx.item() - full.item()) / abs(full.item()),
                                     ((g - g_full).norm() / g_full.norm()).item())
    return out


# Bounds on the errors after (loss, gradient), about 1.5x those measured (README, "Top-k logits").
TOPK_BOUNDS = {  # (distillation, target, k): (loss, gradient)
    ("kd", "hard", 5): (0.027, 0.19),
    ("wsld", "hard", 5): (0.0005, 0.19),
    ("kd", "hard", 10): (0.00073, 0.0005),
    ("wsld", "hard", 10): (0.0005, 0.0005),
    ("kd", "hard", 20): (0.0005, 0.0005),
    ("wsld", "hard", 20): (0.0005, 0.0005),
    ("kd", "hard, 1/4 outside top k", 5): (0.03, 0.3),
    ("wsld", "hard, 1/4 outside top k", 5): (0.0005, 0.21),
    ("kd", "hard, 1/4 outside top k", 10): (0.001, 0.00077),
    ("wsld", "hard, 1/4 outside top k", 10): (0.0005, 0.00053),
    ("kd", "hard, 1/4 outside top k", 20): (0.00065, 0.00061),
    ("wsld", "hard, 1/4 outside top k", 20): (0.0005, 0.0005),
    ("kd", "smoothed 0.1", 5): (0.027, 0.19),
    ("wsld", "smoothed 0.1", 5): (0.0005, 0.19),
    ("kd", "smoothed 0.1", 10): (0.00073, 0.0005),
    ("wsld", "smoothed 0.1", 10): (0.0005, 0.0005),
    ("kd", "smoothed 0.1", 20): (0.0005, 0.0005),
    ("wsld", "smoothed 0.1", 20): (0.0005, 0.0005),
    ("kd", "mixup 0.7", 5): (0.034, 0.75),
    ("wsld", "mixup 0.7", 5): (0.0016, 0.75),
    ("kd", "mixup 0.7", 10): (0.0036, 0.0028),
    ("wsld", "mixup 0.7", 10): (0.0005, 0.0028),
    ("kd", "mixup 0.7", 20): (0.0013, 0.0016),
    ("wsld", "mixup 0.7", 20): (0.0005, 0.0016),
}


@pytest.mark.parametrize("k", [5, 10, 20])
@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_logits_losses_approximate_full_logits(k, case):
    """A confident 1000-class teacher at tau = 2: KD and WSLD from a top-k store against the full
    logits, for hard, label-smoothed and mixup targets; the stored statistics beat the constant fill."""
    errors = topk_loss_errors(k, case)
    for name in ("kd", "wsld"):
        loss_bound, grad_bound = TOPK_BOUNDS[name, case, k]
        loss_error, grad_error = errors[f"{name} after"]
        assert loss_error < loss_bound and grad_error < grad_bound, (name, errors[f"{name} after"])
        assert grad_error < errors[f"{name} before"][1]


def test_bkd_spatial_pools_a_larger_student_map_to_the_teacher_size():
    torch.manual_seed(0)
    head = BKDHead(3, 5, blur_ratio=0.0, alpha=1.0, rescale=False, form="map")
    f_s, f_t = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 2, 2)
    expected = (head.generation(F.adaptive_avg_pool2d(head.align(f_s), 2)) - f_t).pow(2).sum() / 2
    torch.testing.assert_close(head(f_s, f_t), expected)


if __name__ == "__main__":  # the table in README's "Top-k logits": PYTHONPATH=. python -m tests.test_losses
    print(f"{'target':26} {'k':>3}  {'KD loss':>15}  {'KD grad':>15}  {'WSLD loss':>15}  {'WSLD grad':>15}")
    for case in TOPK_CASES:
        for k in (5, 10, 20):
            e = topk_loss_errors(k, case)
            cells = [f"{e[f'{n} before'][i]:6.2%} -> {e[f'{n} after'][i]:6.2%}" for n in ("kd", "wsld") for i in (0, 1)]
            print(f"{case:26} {k:3d}  " + "  ".join(f"{c:>15}" for c in cells))


def test_every_mode_of_the_table_has_its_terms():
    from pipeline.modes import MODES

    assert set(EXPECTED_KEYS) == set(MODES)
    for name, mode in MODES.items():
        crit = DistillationLoss(_student_cfg(name), [("map", "layer2", (4, 3, 3), (6, 3, 3))])
        kind = {"none": None, "bkd": "BKD map", "regression": "regression"}[mode.features]
        assert crit.describe() == (name if kind is None else f"{name}: map -> layer2 ({kind})")
