"""Each feature loss against an independent transcription of the official computation.

The transcriptions below follow what the official BKDSNN code computes (BRDLoss, KDSNNLoss,
LaSNNLoss and the WSLD logits loss, ../shared/METHOD.md), written as plain tensor operations on
convolutions with the official layer shapes: a 1x1 conv `align` when widths differ, the
generation block conv3x3 -> ReLU -> conv3x3 with padding 1, a channel mask of shape
(N, C, 1, 1), `MSELoss(reduction="sum") / N` times alpha; in the Spikingformer-CML form the
generated map is averaged over space before the regression. Everything runs in float64 with the
weights shared (copied from bkd's modules), the same fixed mask on both sides, and compares
values and gradients (student feature and every parameter) within 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.student.losses import BKDHead, FeatureRegression, wsld_loss

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)



def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def _conv_weights(head: nn.Module, student_dim: int, teacher_dim: int, spatial_head: bool) -> dict:
    """The official modules' weights, taken from bkd's head: conv kernels for every layer. bkd's
    vector form holds linear layers; the official convolutions on a 1x1 map use only their centre
    taps, so the other taps get random values here, to show they cannot matter."""
    g = torch.Generator().manual_seed(99)
    weights = {}
    if isinstance(head.align, nn.Identity):
        weights["align"] = None
    else:
        w, b = head.align.weight, head.align.bias
        weights["align"] = (w if spatial_head else w[:, :, None, None], b)
    for key, layer in (("g1", head.generation[0]), ("g2", head.generation[2])):
        w = layer.weight
        if not spatial_head:
            full = torch.randn(teacher_dim, teacher_dim, 3, 3, generator=g)
            full[:, :, 1, 1] = 0
            w = full + F.pad(w[:, :, None, None], (1, 1, 1, 1))
        weights[key] = (w, layer.bias)
    return weights


def _official_brd(student, teacher, weights, mask, alpha, use_clip, spatial_mean):
    """BRDLoss.forward: align, optional clip (max of the aligned map), mask, generation, sum-MSE / N."""
    s = student
    if weights["align"] is not None:
        s = F.conv2d(s, *weights["align"])
    t = teacher
    if use_clip:
        t = t / t.max() * s.max()
    masked = s * mask
    new = F.conv2d(F.relu(F.conv2d(masked, *weights["g1"], padding=1)), *weights["g2"], padding=1)
    if spatial_mean:  # the Spikingformer-CML student: the generated map, averaged over space
        new = new.mean((2, 3))
    return alpha * ((new - t) ** 2).sum() / s.shape[0]


def _mask(n, c, seed=5, keep=0.85):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, c, 1, 1, generator=g) < keep).double()
    assert 0 < mask.sum() < mask.numel()
    return mask


@pytest.mark.parametrize("form", ["cml", "map", "pooled"])
@pytest.mark.parametrize("widths", [(6, 10), (8, 8)], ids=["aligned", "same-width"])
@pytest.mark.parametrize("use_clip", [False, True], ids=["published", "use_clip"])
def test_bkd_matches_the_official_brd_loss(form, widths, use_clip):
    torch.manual_seed(0)
    cs, ct = widths
    n, h, w, alpha = 4, 5, 6, 2e-3
    head = BKDHead(cs, ct, blur_ratio=0.15, alpha=alpha, rescale=use_clip, form=form).double()
    student = {"cml": torch.rand(n, cs, h, w), "map": torch.rand(n, cs, h, w), "pooled": torch.rand(n, cs)}[form]
    teacher = {"cml": torch.rand(n, ct) * 3, "map": torch.rand(n, ct, h, w) * 3, "pooled": torch.rand(n, ct) * 3}[form]
    mask = _mask(n, ct)
    student.requires_grad_(True)
    ours = head(student, teacher, mask=mask if form != "pooled" else mask[:, :, 0, 0])

    weights = _conv_weights(head, cs, ct, spatial_head=form != "pooled")
    ref_weights = {k: None if v is None else tuple(t.detach().clone().requires_grad_(True) for t in v)
                   for k, v in weights.items()}
    ref_student = student.detach().clone().requires_grad_(True)
    as_map = ref_student if form != "pooled" else ref_student[:, :, None, None]
    ref = _official_brd(as_map, teacher, ref_weights, mask, alpha, use_clip, spatial_mean=form != "map")
    _close(ours, ref)

    # gradients: the student feature and every parameter of A and G (centre taps for the vector form)
    ours_params = ([head.align.weight, head.align.bias] if cs != ct else []) + \
        [head.generation[0].weight, head.generation[0].bias, head.generation[2].weight, head.generation[2].bias]
    ref_params = (list(ref_weights["align"]) if cs != ct else []) + list(ref_weights["g1"]) + list(ref_weights["g2"])
    got = torch.autograd.grad(ours, [student, *ours_params])
    want = torch.autograd.grad(ref, [ref_student, *ref_params])
    for g, r in zip(got, want):
        if g.shape != r.shape:  # a linear layer against its conv: compare the taps it has
            r = r[:, :, 1, 1] if r.shape[-1] == 3 else r[:, :, 0, 0]
        _close(g, r)


def test_cml_form_differs_from_generation_on_the_pooled_vector():
    """The reason for the cml form: G does not commute with the spatial mean."""
    torch.manual_seed(1)
    head = BKDHead(6, 6, blur_ratio=0.0, alpha=1.0, form="cml").double()
    student, teacher = torch.rand(3, 6, 4, 4), torch.rand(3, 6)
    on_map = head(student, teacher)
    g1, g2 = head.generation[0], head.generation[2]
    pooled = student.mean((2, 3))
    centre = F.linear(F.relu(F.linear(pooled, g1.weight[:, :, 1, 1], g1.bias)), g2.weight[:, :, 1, 1], g2.bias)
    on_vector = ((centre - teacher) ** 2).sum() / 3
    assert abs(on_map - on_vector) / on_vector > 0.01


def test_clip_takes_the_max_of_the_aligned_map_before_the_mask():
    torch.manual_seed(2)
    head = BKDHead(3, 5, blur_ratio=0.5, alpha=1.0, rescale=True, form="cml").double()
    student, teacher = torch.rand(2, 3, 4, 4), torch.rand(2, 5) + 0.5
    mask = torch.zeros(2, 5, 1, 1)  # everything dropped: the max must still come from the unmasked map
    aligned = head.align(student)
    restored = head.generation(aligned * mask).mean((2, 3))
    want = (((restored - teacher / teacher.max() * aligned.max()) ** 2).sum() / 2)
    _close(head(student, teacher, mask=mask), want)


def _official_regression(student, teacher, align, alpha):
    """KDSNNLoss / one LaSNNLoss layer: align by a 1x1 conv when widths differ, sum-MSE / N."""
    s = F.conv2d(student, *align) if align is not None else student
    return alpha * ((s - teacher) ** 2).sum() / student.shape[0]


@pytest.mark.parametrize("widths", [(6, 10), (8, 8)], ids=["aligned", "same-width"])
@pytest.mark.parametrize("spatial", [True, False], ids=["map", "vector"])
def test_kdsnn_matches_the_official_loss(widths, spatial):
    torch.manual_seed(3)
    cs, ct = widths
    n, alpha = 4, 7e-5
    term = FeatureRegression(cs, ct, alpha, spatial=spatial).double()
    student = (torch.rand(n, cs, 3, 3) if spatial else torch.rand(n, cs)).requires_grad_(True)
    teacher = torch.rand(n, ct, 3, 3) if spatial else torch.rand(n, ct)
    ours = term(student, teacher)
    align = None
    if cs != ct:
        w, b = term.align.weight, term.align.bias
        align = (w if spatial else w[:, :, None, None], b)
    ref_student = student.detach().clone().requires_grad_(True)
    as_map = ref_student if spatial else ref_student[:, :, None, None]
    ref = _official_regression(as_map, teacher if spatial else teacher[:, :, None, None], align, alpha)
    _close(ours, ref)
    _close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(ref, ref_student)[0])


def test_lasnn_is_the_sum_of_per_layer_regressions():
    from pipeline.config import BKDConfig, StudentConfig
    from pipeline.student.losses import DistillationLoss

    torch.manual_seed(4)
    cfg = StudentConfig(distill="lasnn", bkd=BKDConfig(alpha=7e-5))
    shapes = [((4, 8, 8), (8, 8, 8)), ((8, 4, 4), (16, 4, 4)), ((16, 2, 2), (16, 2, 2))]
    crit = DistillationLoss(cfg, [(f"s{i}", f"t{i}", s, t) for i, (s, t) in enumerate(shapes)]).double()
    students = {f"s{i}": torch.rand(2, *s) for i, (s, _) in enumerate(shapes)}
    teachers = {f"t{i}": torch.rand(2, *t) for i, (_, t) in enumerate(shapes)}
    got = crit(students, torch.randn(2, 3), torch.tensor([0, 1]), teachers, torch.randn(2, 3))["lasnn"]
    want = 0.0
    for i, term in enumerate(crit.feature_terms):
        align = None if isinstance(term.align, nn.Identity) else (term.align.weight, term.align.bias)
        want = want + _official_regression(students[f"s{i}"], teachers[f"t{i}"], align, 7e-5)
    _close(got, want)


def _official_wsld(z_t, z_s, target, temp):
    """get_logits_loss: soft CE at temp, weighted by 1 - exp(-max(0, CE_s / (CE_t + 1e-7))) from the
    detached logits against the target as given (one-hot or soft), times temp^2, batch mean."""
    soft = F.softmax(z_t / temp, 1)
    loss = -(soft * F.log_softmax(z_s / temp, 1)).sum(1, keepdim=True)
    ce_s = -(target * F.log_softmax(z_s.detach(), 1)).sum(1, keepdim=True)
    ce_t = -(target * F.log_softmax(z_t.detach(), 1)).sum(1, keepdim=True)
    weight = 1 - torch.exp(-torch.max(ce_s / (ce_t + 1e-7), torch.zeros(1)))
    return temp**2 * (weight * loss).mean()


@pytest.mark.parametrize("soft", [False, True], ids=["one-hot", "soft-target"])
def test_wsld_matches_the_official_logits_loss(soft):
    torch.manual_seed(5)
    n, k = 8, 10
    z_s = (torch.randn(n, k) * 2).requires_grad_(True)
    z_t = torch.randn(n, k) * 3
    labels = torch.randint(0, k, (n,))
    target = F.one_hot(labels, k).double()
    if soft:  # what timm's label smoothing makes of the labels
        target = target * 0.9 + 0.1 / k
    ours = wsld_loss(z_s, z_t, target if soft else labels, 2.0)
    ref_s = z_s.detach().clone().requires_grad_(True)
    ref = _official_wsld(z_t, ref_s, target, 2.0)
    _close(ours, ref)
    _close(torch.autograd.grad(ours, z_s)[0], torch.autograd.grad(ref, ref_s)[0])
