"""Distillation losses: blurred knowledge distillation (BKD), Hinton KD and WSLD.

Notation (per batch of N samples): `f_s` the student's penultimate feature averaged over
the T timesteps, `f_t` the cached teacher pre-logits, `z_s`/`z_t` logits, `y` labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import StudentConfig
from pipeline.errors import BkdError


class BKDHead(nn.Module):
    """Align, blur and restore the student feature; regress the teacher feature.

    a   = A(f_s)                      A: 1x1 conv / linear when widths differ, identity otherwise
    M   ~ Bernoulli(1 - lambda)       per sample and per channel, fresh at every call
    g   = G(M * a)                    G: conv3x3 - ReLU - conv3x3 (two linear layers on pooled features)
    f_t' = f_t / max(f_t) * max(a)    maxima over the whole batch; f_t is a constant (detached)
    L_bkd = alpha * sum((g - f_t')^2) / N

    Features are either pooled, shaped (N, C), or spatial maps, shaped (N, C, H, W); a student
    map of another size is average-pooled to the teacher's H x W after alignment. The head is
    trained with the student and dropped at inference.
    """

    def __init__(self, student_dim: int, teacher_dim: int, blur_ratio: float = 0.15,
                 alpha: float = 2e-3, rescale: bool = True, spatial: bool = False):
        super().__init__()
        if not 0.0 <= blur_ratio < 1.0:
            raise ValueError(f"blur_ratio must be in [0, 1), got {blur_ratio}")
        self.blur_ratio, self.alpha, self.rescale, self.spatial = blur_ratio, alpha, rescale, spatial
        if spatial:
            self.align = nn.Conv2d(student_dim, teacher_dim, 1) if student_dim != teacher_dim else nn.Identity()
            self.generation = nn.Sequential(
                nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1),
            )
        else:
            # A 3x3 convolution with padding 1 on a 1x1 map only uses its centre tap: a linear layer.
            self.align = nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()
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
        aligned = self.align(student_feature)
        if self.spatial and aligned.dim() == 4 and aligned.shape[-2:] != teacher_feature.shape[-2:]:
            aligned = F.adaptive_avg_pool2d(aligned, teacher_feature.shape[-2:])
        if aligned.shape != teacher_feature.shape:
            raise ValueError(f"aligned student feature {tuple(aligned.shape)} does not match "
                             f"teacher feature {tuple(teacher_feature.shape)}")
        if mask is None:
            mask = self.blur_mask(aligned)
        restored = self.generation(aligned * mask)
        target = teacher_feature.detach().to(aligned.dtype)
        if self.rescale:
            teacher_max = target.max()
            if not teacher_max > 0:  # the division would flip signs or blow up
                raise BkdError(f"BKD rescale needs a positive teacher feature maximum in the batch, "
                                 f"got {teacher_max.item()}; set student.bkd.rescale: false for this teacher")
            target = target / teacher_max * aligned.max()
        return self.alpha * (restored - target).pow(2).sum() / student_feature.shape[0]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def wsld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """Weighted soft-label distillation (Zhou et al., ICLR 2021).

    ce_soft_i = -sum_k softmax(z_t / tau)_ik * log_softmax(z_s / tau)_ik
    w_i       = 1 - exp(-max(0, CE(z_s, y)_i / (CE(z_t, y)_i + 1e-7)))    (z_s detached in w)
    L_wsld    = tau^2 * mean_i(w_i * ce_soft_i)
    """
    teacher_logits = teacher_logits.float()
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    ce_soft = -(soft_targets * F.log_softmax(student_logits / temperature, dim=1)).sum(1)
    ce_student = F.cross_entropy(student_logits.detach(), labels, reduction="none")
    ce_teacher = F.cross_entropy(teacher_logits, labels, reduction="none")
    weight = 1.0 - torch.exp(-torch.clamp(ce_student / (ce_teacher + 1e-7), min=0.0))
    return temperature**2 * (weight * ce_soft).mean()


class DistillationLoss(nn.Module):
    """The student objective for one distillation mode.

    none:  L_ce
    kd:    L_ce + w * L_kd
    wsld:  L_ce + w * L_wsld
    bkd:   L_ce + L_bkd
    mixed: L_ce + L_bkd + w * L_wsld     (the paper's best)
    with w = student.logits.weight. `forward` returns every term and their sum under "loss".
    """

    def __init__(self, cfg: StudentConfig, student_dim: int, teacher_dim: int, spatial: bool = False):
        super().__init__()
        self.spatial = spatial  # BKD on feature maps (N, C, H, W) instead of pooled features
        self.mode = cfg.distill
        self.temperature, self.logits_weight = cfg.logits.temperature, cfg.logits.weight
        self.bkd = None
        if self.mode in ("bkd", "mixed"):
            self.bkd = BKDHead(student_dim, teacher_dim, cfg.bkd.blur_ratio, cfg.bkd.alpha, cfg.bkd.rescale,
                               spatial=spatial)

    @property
    def uses_teacher(self) -> bool:
        return self.mode != "none"

    def forward(self, student_feature, student_logits, labels, teacher_feature=None, teacher_logits=None):
        terms = {"ce": F.cross_entropy(student_logits, labels)}
        if self.bkd is not None:
            terms["bkd"] = self.bkd(student_feature, teacher_feature)
        if self.mode == "kd":
            terms["kd"] = self.logits_weight * kd_loss(student_logits, teacher_logits, self.temperature)
        elif self.mode in ("wsld", "mixed"):
            terms["wsld"] = self.logits_weight * wsld_loss(student_logits, teacher_logits, labels, self.temperature)
        terms["loss"] = sum(terms.values())
        return terms
