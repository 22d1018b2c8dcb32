"""The mix: mixup or cutmix of a view with a partner sample, and the soft targets it trains on.

The last `augment.mix_views` of the K cached views are mixed. A mixed view's parameters hold the `Mix`
fields, then the partner's own fields (p_*): the partner's view is rebuilt from its pixels exactly as
the sample's, and the mixed view is lam * own + (1 - lam) * partner (mixup) or the partner's pixels
inside the box (cutmix, lam = 1 - box area / image area, timm's corrected lam). `lam_bits` holds the
float32 lam bit for bit. An unmixed view's mix fields are `UNMIXED`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pipeline import rawviews
from pipeline.config import AugmentConfig
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.augment.views import ViewAugmenter

MIXUP, CUTMIX = rawviews.MIXUP, rawviews.CUTMIX  # values of the `mix` field (0: not mixed)


class Mix(NamedTuple):
    """The mix fields of one view, or (`Mixer.fields`) columns of them for a batch of parameter vectors."""

    mix: int  # 0: not mixed, MIXUP or CUTMIX
    partner: int  # the partner sample, -1 when not mixed
    lam_bits: int  # the float32 weight of the sample's own pixels, bit for bit
    box_top: int  # the cutmix box, all 0 for mixup
    box_left: int
    box_height: int
    box_width: int


MIX = Mix._fields
UNMIXED = Mix(0, -1, 0, 0, 0, 0, 0)


def mixes(cfg: AugmentConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0


class Mixer:
    """The mix of one config on views of height x width, whose `Mix` fields lie at `section` of the
    parameter vectors: which views are mixed, drawing the fields, reading partners and lam back, and
    the soft targets. Without mixup and cutmix every view reads as `UNMIXED`."""

    def __init__(self, cfg: AugmentConfig, section: slice, height: int, width: int):
        self.cfg, self.section, self.height, self.width = cfg, section, height, width
        self.mixes = mixes(cfg)

    def mixed_views(self, views: int) -> range:
        """The cached views that are mixed: the last `augment.mix_views` of the K (never view 0)."""
        return range(max(1, views - self.cfg.mix_views), views) if self.mixes else range(0)

    def draw(self, rng: np.random.Generator, index: int, num_samples: int | None) -> Mix:
        """The mix fields of one mixed view of sample `index`: a partner among the split's `num_samples`."""
        if num_samples is None or num_samples < 2:
            raise ConfigError("augment.mixup/cutmix need a split of at least 2 samples to draw partners from")
        partner = int(rng.integers(0, num_samples - 1))
        partner += partner >= index  # any other sample, uniformly
        use_cutmix = self.cfg.cutmix > 0 and (self.cfg.mixup <= 0 or rng.random() < 0.5)  # timm's switch prob 0.5
        lam = float(rng.beta(*(2 * [self.cfg.cutmix if use_cutmix else self.cfg.mixup])))
        box = [0, 0, 0, 0]
        if use_cutmix:  # timm's rand_bbox: a box of area (1 - lam), centred uniformly, clipped to the image
            h, w = self.height, self.width
            cut = np.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            top, bottom = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
            left, right = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
            box = [int(top), int(left), int(bottom - top), int(right - left)]
            lam = 1.0 - box[2] * box[3] / (h * w)  # timm's corrected lam: the area actually kept
        lam_bits = int(np.float32(lam).view(np.int32))
        return Mix(CUTMIX if use_cutmix else MIXUP, partner, lam_bits, *box)

    def fields(self, params: np.ndarray | torch.Tensor) -> Mix:
        """The mix fields of `params` (B, P), one column each; UNMIXED's values without mixing."""
        params = np.asarray(params)
        if not self.mixes:
            return Mix(*(np.full(len(params), value, np.int32) for value in UNMIXED))
        return Mix(*params[:, self.section].T)

    def partners(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """The partner sample of each view in `params` (B, P); -1 where the view is not mixed."""
        m = self.fields(params)
        return np.where(m.mix > 0, m.partner, -1).astype(np.int64)

    def lam(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B,) float32: the weight of the sample's own pixels in each view (1 where not mixed)."""
        m = self.fields(params)
        lam = np.ascontiguousarray(m.lam_bits, dtype=np.int32).view(np.float32)
        return np.where(m.mix > 0, lam, np.float32(1.0)).astype(np.float32)

    def targets(self, labels: torch.Tensor, params: np.ndarray | torch.Tensor, all_labels: torch.Tensor,
                num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """(B, num_classes) soft targets of the views, as timm's Mixup builds them: lam * s(y) +
        (1 - lam) * s(y_partner) with s the label-smoothed one-hot (off value smoothing / classes)."""
        own = smoothed_one_hot(labels, num_classes, smoothing)
        partners = self.partners(params)
        mixed = partners >= 0
        if not mixed.any():
            return own
        lam = torch.from_numpy(self.lam(params)).view(-1, 1)
        partner_labels = labels.clone()
        partner_labels[torch.from_numpy(mixed)] = all_labels[torch.from_numpy(partners[mixed])]
        return lam * own + (1 - lam) * smoothed_one_hot(partner_labels, num_classes, smoothing)

    def target_classes(self, labels, view_params, all_labels=None) -> np.ndarray:
        """(n, V, 2) int64: the classes each view's training target is made of -- the sample's label,
        and its partner's label for a mixed view (the label again otherwise). `labels` (n,) are the
        rows' labels, `view_params` (n, V, P), `all_labels` the split's labels (for the partners)."""
        labels = np.asarray(labels, dtype=np.int64)
        params = np.asarray(view_params)
        out = np.repeat(np.repeat(labels[:, None, None], params.shape[1], 1), 2, 2)
        for v in range(params.shape[1] if self.mixes else 0):
            partners = self.partners(params[:, v])
            mixed = partners >= 0
            if mixed.any():
                out[mixed, v, 1] = np.asarray(all_labels, dtype=np.int64)[partners[mixed]]
        return out


def mix_pixels(own: torch.Tensor, other: torch.Tensor, m: Mix) -> torch.Tensor:
    """The mixed view of a sample's normalized view `own` and its partner's `other`, by the fields `m`."""
    return rawviews.mix_pixels(own, other, m.mix, m.lam_bits, (m.box_top, m.box_left, m.box_height, m.box_width))


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, num_classes): timm's label-smoothed one-hot, 1 - smoothing + smoothing / K at the label."""
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off).scatter(1, labels.view(-1, 1), 1.0 - smoothing + off)


def partner_inputs(split, augmenter: ViewAugmenter, params, like: torch.Tensor) -> torch.Tensor | None:
    """The raw source values of the mix partners of `params`' views, from `split` (zeros where a view is
    not mixed; None when none is): what `apply` rebuilds the partners' views from. `like`: the
    batch's own raw values."""
    partners = augmenter.partners(params)
    if not (partners >= 0).any():
        return None
    out = torch.zeros_like(like)
    out[torch.from_numpy(partners >= 0)] = split.read(partners[partners >= 0])
    return out
