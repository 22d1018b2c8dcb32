"""Distillation losses: blurred knowledge distillation (BKD, three forms), Hinton KD, WSLD and
the feature baselines KDSNN and LaSNN, as named terms.

Notation (per batch of N samples): `S` a student feature (a location's output averaged over
the T timesteps: a map (N, C, H, W) or a pooled vector (N, C)), `f_t` / `F_t` the cached teacher
feature (pooled vector or map), `z_s`/`z_t` logits, `y` the training target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import StudentConfig
from pipeline.errors import BkdError
from pipeline.modes import MODES


def _align(student_dim: int, teacher_dim: int, spatial: bool) -> nn.Module:
    """A: a 1x1 convolution (a linear layer on vectors) when the widths differ, identity otherwise."""
    if student_dim == teacher_dim:
        return nn.Identity()
    return nn.Conv2d(student_dim, teacher_dim, 1) if spatial else nn.Linear(student_dim, teacher_dim)


def _to_teacher_grid(aligned: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """An aligned student map of another size, average-pooled to the teacher map's H x W."""
    if aligned.dim() == 4 and teacher_feature.dim() == 4 and aligned.shape[-2:] != teacher_feature.shape[-2:]:
        aligned = F.adaptive_avg_pool2d(aligned, teacher_feature.shape[-2:])
    return aligned


BKD_FORMS = ("cml", "map", "pooled")


def bkd_form(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> str:
    """The BKD form a (student, teacher) feature pair calls for, from their per-sample shapes.

    student (C, H, W), teacher (C',):        cml     generation on the student map, then its spatial mean
    student (C, H, W), teacher (C', H', W'): map     map to map
    student (C,),      teacher (C',):        pooled  vector to vector
    """
    if len(teacher_shape) not in (1, 3) or len(student_shape) not in (1, 3):
        raise BkdError(f"BKD needs (C,) vectors or (C, H, W) maps, got student {student_shape}, teacher {teacher_shape}")
    if len(student_shape) == 1:
        if len(teacher_shape) == 3:
            raise BkdError(f"BKD cannot regress a teacher map {teacher_shape} from a pooled student vector; "
                           "distil a student map (student.features: {map: ...} or a stage) instead")
        return "pooled"
    return "cml" if len(teacher_shape) == 1 else "map"


class BKDHead(nn.Module):
    """Blurred knowledge distillation for one (student feature, teacher feature) pair, in one of
    the three forms of the official BRDLoss (`form`, see `bkd_form`):

    a     = A(S)                        A: 1x1 conv (linear on vectors) when widths differ, else identity;
                                        a student map of another size is then average-pooled to the teacher's
    M     ~ Bernoulli(1 - lambda)       (N, C, 1, 1): one keep/drop per sample and channel, fresh at every call
    f_t'  = f_t                         as published (`rescale` off); with `rescale` (the official --use_clip):
    f_t'  = f_t / max(f_t) * max(a)     maxima over the whole batch, of the aligned student *before* the mask
    cml:    L = alpha * sum_{n,c} (mean_hw G(M * a) - f_t')^2 / N       S a map, f_t a pooled vector
            G = conv3x3 - ReLU - conv3x3 runs on the map (zero padding): the Spikingformer-CML form
    map:    L = alpha * sum_{n,c,h,w} (G(M * a) - F_t')^2 / N           both maps (SEW layer4, DVS stages)
    pooled: L = alpha * sum_{n,c} (G(M * a) - f_t')^2 / N               both vectors; G is two linear layers,
            which is what the 3x3 convolutions compute on a 1x1 map (their centre taps)

    f_t is a constant (detached). A and G train with the student and are dropped at inference.
    """

    def __init__(self, student_dim: int, teacher_dim: int, blur_ratio: float = 0.15,
                 alpha: float = 2e-3, rescale: bool = False, form: str = "pooled"):
        super().__init__()
        if not 0.0 <= blur_ratio < 1.0:
            raise ValueError(f"blur_ratio must be in [0, 1), got {blur_ratio}")
        if form not in BKD_FORMS:
            raise ValueError(f"form must be one of {BKD_FORMS}, got {form!r}")
        self.blur_ratio, self.alpha, self.rescale, self.form = blur_ratio, alpha, rescale, form
        spatial = form != "pooled"
        self.align = _align(student_dim, teacher_dim, spatial)
        if spatial:
            self.generation = nn.Sequential(
                nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1),
            )
        else:
            self.generation = nn.Sequential(
                nn.Linear(teacher_dim, teacher_dim),
                nn.ReLU(inplace=True),
                nn.Linear(teacher_dim, teacher_dim),
            )

    def blur_mask(self, aligned: torch.Tensor) -> torch.Tensor:
        shape = aligned.shape[:2] + (1,) * (aligned.dim() - 2)
        keep = torch.full(shape, 1.0 - self.blur_ratio, device=aligned.device, dtype=aligned.dtype)
        return torch.bernoulli(keep)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        expected_dims = {"pooled": (2, 2), "cml": (4, 2), "map": (4, 4)}[self.form]
        if (student_feature.dim(), teacher_feature.dim()) != expected_dims:
            raise ValueError(f"BKD form {self.form} takes student {expected_dims[0]}-D and teacher {expected_dims[1]}-D "
                             f"features, got {tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}")
        aligned = _to_teacher_grid(self.align(student_feature), teacher_feature)
        if mask is None:
            mask = self.blur_mask(aligned)
        restored = self.generation(aligned * mask)
        if self.form == "cml":
            restored = restored.mean((2, 3))
        if restored.shape != teacher_feature.shape:
            raise ValueError(f"restored student feature {tuple(restored.shape)} does not match "
                             f"teacher feature {tuple(teacher_feature.shape)}")
        target = teacher_feature.detach().to(aligned.dtype)
        if self.rescale:
            teacher_max = target.max()
            if not teacher_max > 0:  # the division would flip signs or blow up
                raise BkdError(f"BKD rescale needs a positive teacher feature maximum in the batch, "
                               f"got {teacher_max.item()}; set student.bkd.rescale: false for this teacher")
            target = target / teacher_max * aligned.max()
        return self.alpha * (restored - target).pow(2).sum() / student_feature.shape[0]


class FeatureRegression(nn.Module):
    """The feature term of the KDSNN and LaSNN baselines, as the official code computes it:

    L = alpha * sum (A(S) - F_t)^2 / N       A: 1x1 conv (linear on vectors) when widths differ

    no blur and no generation block. A student map regressing a teacher vector is averaged over
    space after A (A is linear, so this equals aligning the pooled vector); a student map of
    another size than the teacher's is average-pooled to it.
    """

    def __init__(self, student_dim: int, teacher_dim: int, alpha: float, spatial: bool):
        super().__init__()
        self.alpha = alpha
        self.align = _align(student_dim, teacher_dim, spatial)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        aligned = _to_teacher_grid(self.align(student_feature), teacher_feature)
        if aligned.dim() == 4 and teacher_feature.dim() == 2:
            aligned = aligned.mean((2, 3))
        if aligned.shape != teacher_feature.shape:
            raise ValueError(f"aligned student feature {tuple(aligned.shape)} does not match "
                             f"teacher feature {tuple(teacher_feature.shape)}")
        target = teacher_feature.detach().to(aligned.dtype)
        return self.alpha * (aligned - target).pow(2).sum() / student_feature.shape[0]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(log_p_s.dtype) / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def wsld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """Weighted soft-label distillation (Zhou et al., ICLR 2021).

    ce_soft_i = -sum_k softmax(z_t / tau)_ik * log_softmax(z_s / tau)_ik
    w_i       = 1 - exp(-max(0, CE(z_s, y)_i / (CE(z_t, y)_i + 1e-7)))    (z_s detached in w)
    L_wsld    = tau^2 * mean_i(w_i * ce_soft_i)
    """
    teacher_logits = teacher_logits.to(student_logits.dtype)  # float16 in the store
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    ce_soft = -(soft_targets * F.log_softmax(student_logits / temperature, dim=1)).sum(1)
    ce_student = F.cross_entropy(student_logits.detach(), labels, reduction="none")
    ce_teacher = F.cross_entropy(teacher_logits, labels, reduction="none")
    weight = 1.0 - torch.exp(-torch.clamp(ce_student / (ce_teacher + 1e-7), min=0.0))
    return temperature**2 * (weight * ce_soft).mean()


class DistillationLoss(nn.Module):
    """The student objective for one distillation mode, as named terms (summed under "loss").

    L = L_ce + sum_pairs L_feat + w * L_logits, the terms the mode's row of pipeline.modes.MODES names:

    feature term  bkd: BKDHead per pair, named "bkd"; regression: FeatureRegression per pair, named after
                  the mode (kdsnn, lasnn); none: no term
    logits term   kd: w * kd_loss, named "kd"; wsld: w * wsld_loss, named "wsld"; none: no term

    with w = student.logits.weight. `pairs` lists (student location, teacher location, student shape,
    teacher shape) per sample, in the order of the mode's pairs field; the shapes choose the BKD form.
    """

    def __init__(self, cfg: StudentConfig, pairs: list[tuple[str, str, tuple, tuple]]):
        super().__init__()
        self.mode, self.terms = cfg.distill, MODES[cfg.distill]
        self.temperature, self.logits_weight = cfg.logits.temperature, cfg.logits.weight
        self.pairs = [(s, t) for s, t, _, _ in pairs] if self.terms.features != "none" else []
        self.feature_terms = nn.ModuleList()
        for _, _, s_shape, t_shape in (pairs if self.pairs else []):
            if self.terms.features == "bkd":
                form = bkd_form(tuple(s_shape), tuple(t_shape))
                term = BKDHead(s_shape[0], t_shape[0], cfg.bkd.blur_ratio, cfg.bkd.alpha, cfg.bkd.rescale, form)
            else:
                term = FeatureRegression(s_shape[0], t_shape[0], cfg.bkd.alpha, spatial=len(s_shape) == 3)
            self.feature_terms.append(term)

    @property
    def uses_teacher(self) -> bool:
        return self.mode != "none"

    @property
    def student_locations(self) -> list[str]:
        return [s for s, _ in self.pairs]

    @property
    def teacher_locations(self) -> list[str]:
        return [t for _, t in self.pairs]

    def describe(self) -> str:
        """One line: the mode and, per feature pair, the locations and the form."""
        parts = []
        for (s, t), term in zip(self.pairs, self.feature_terms):
            kind = f"BKD {term.form}" if self.terms.features == "bkd" else self.terms.features
            parts.append(f"{s} -> {t} ({kind})")
        return f"{self.mode}" + (f": {', '.join(parts)}" if parts else "")

    def forward(self, student_features: dict, student_logits, labels, teacher_features: dict | None = None,
                teacher_logits=None):
        terms = {"ce": F.cross_entropy(student_logits, labels)}
        if self.feature_terms:
            losses = [term(student_features[s], teacher_features[t])
                      for (s, t), term in zip(self.pairs, self.feature_terms)]
            terms["bkd" if self.terms.features == "bkd" else self.mode] = sum(losses)
        if self.terms.logits == "kd":
            terms["kd"] = self.logits_weight * kd_loss(student_logits, teacher_logits, self.temperature)
        elif self.terms.logits == "wsld":
            terms["wsld"] = self.logits_weight * wsld_loss(student_logits, teacher_logits, labels, self.temperature)
        terms["loss"] = sum(terms.values())
        return terms
