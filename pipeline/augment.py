"""Augmented views that extraction and training rebuild identically.

A *view* of sample i is the input after an augmentation whose parameters are a pure function
of (augment.seed, i, view index v). View 0 is always the clean input. Extraction draws the
parameters, stores them beside the teacher's targets, and feeds the teacher
`apply(images, params, partners)`; training reads the stored parameters and rebuilds the very
same tensor for the student. Parameters are small integer vectors. A view is built in the
order of timm's training transform:

Views are cut from the split's source pixels, which for ImageNet with `data.load_size` are larger
than the input (`source_shape`): a RandomResizedCrop box lies in the source image and is resized to
the input size, every other base works on the input-sized centre crop, and the clean input (the
identity) is that centre crop.

1. the geometric base, one layout per `augment.kind`:
     pad_crop_flip       (top, left, flip)             crop of the image zero-padded by `pad` (raw 0)
     resized_crop_flip   (top, left, height, width, flip)   RandomResizedCrop box, resized back
     event_flip_roll     (dy, dx, flip)                circular shift of event frames, then flip
     none                (identity,)                   always 0: every view is the clean input
2. the recipe (`recipe_seed`, with `augment.randaugment` or `augment.erasing`): timm's own
   RandAugment on the uint8 image, then timm's RandomErasing on the normalized tensor, each run
   with Python's, NumPy's and torch's generators seeded from the view's recipe seed (and restored
   afterwards), so their op choices, magnitudes with noise, signs, boxes and fills are a pure
   function of the stored seed -- the ops are timm's, not a copy of them;
3. the mix (`mix_views` of the K views, the last ones): mixup or cutmix with a partner sample,
   (mix, partner, lam_bits, box_top, box_left, box_height, box_width) followed by the partner's
   own unmixed parameters (p_*): the partner's view is rebuilt from its pixels exactly as the
   sample's, and the mixed view is lam * own + (1 - lam) * partner (mixup) or the partner's
   pixels inside the box (cutmix, lam = 1 - box area / image area, timm's corrected lam).
   `lam_bits` holds the float32 lam bit for bit.

Parameters are drawn from `numpy.random.default_rng([seed, stream, index, view])`: stream 0
holds the cached views; `bkd train-student` with `student.augment: online` draws fresh ones
from stream 1 + epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from pipeline.config import AugmentConfig
from pipeline.data import centre_crop, centre_offsets
from pipeline.errors import ConfigError, clip

PARAM_NAMES = {
    "none": ("identity",),
    "pad_crop_flip": ("top", "left", "flip"),
    "resized_crop_flip": ("top", "left", "height", "width", "flip"),
    "event_flip_roll": ("dy", "dx", "flip"),
}
RECIPE = ("recipe_seed",)
MAX_MAGNITUDE = 9.99  # RandAugment's magnitude cap (timm's is 10; see recipe_transforms)
MIX = ("mix", "partner", "lam_bits", "box_top", "box_left", "box_height", "box_width")
MIXUP, CUTMIX = 1, 2  # values of the `mix` parameter (0: not mixed)


def recipe_transforms(cfg: AugmentConfig, image_shape, mean, scale: float):
    """(timm RandAugment or None, timm RandomErasing or None) for `cfg`, with timm's hparams for this
    image size and dataset mean; a bad RandAugment string is a one-line ConfigError."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    randaugment = None
    if cfg.randaugment:
        channels, size = image_shape[-3], min(image_shape[-2:])
        fill = tuple(min(255, round(m / scale)) for m in mean)
        hparams = {"translate_const": int(size * 0.45), "img_mean": fill if channels > 1 else fill[0]}
        if "-mmax" not in cfg.randaugment:
            # Magnitude noise can reach timm's cap of 10, where PosterizeIncreasing keeps 0 bits, which
            # Pillow >= 10 refuses (an error mid-extraction); a cap just under 10 keeps 1 bit.
            hparams["magnitude_max"] = MAX_MAGNITUDE
        try:
            randaugment = rand_augment_transform(cfg.randaugment, hparams)
        except Exception as exc:  # noqa: BLE001 -- timm's parser raises assertions and KeyErrors
            raise ConfigError(f"augment.randaugment: {clip(repr(cfg.randaugment), 80)} is not a timm RandAugment "
                              f"spec such as rand-m9-n1-mstd0.4-inc1 ({type(exc).__name__}: {clip(str(exc), 80)})") \
                from None
    erasing = RandomErasing(cfg.erasing, mode=cfg.erasing_mode, device="cpu") if cfg.erasing > 0 else None
    return randaugment, erasing


@contextlib.contextmanager
def seeded(seed: int):
    """Python's, NumPy's and torch's (CPU) global generators seeded from `seed`, restored afterwards:
    timm's transforms draw from them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ViewAugmenter:
    """Draws and applies the views of one dataset's inputs (shape (C, H, W) or (T, C, H, W)).

    Views are made from the raw source values (uint8 images, float event frames), in the order of
    torchvision's and timm's training transforms: the geometric base and RandAugment on the raw
    image, then the normalization (pixel = (raw * scale - mean) / std, the split's), then random
    erasing and the mix on normalized tensors. `mean`, `std`, `scale` default to no normalization.
    `source_shape`: the shape of the pixels views are cut from (default: `image_shape`, the output).
    """

    def __init__(self, cfg: AugmentConfig, image_shape: tuple[int, ...], mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None, scale: float = 1.0, source_shape: tuple[int, ...] | None = None):
        if cfg.kind not in PARAM_NAMES:  # also checked by config validation; here for direct use
            raise ConfigError(f"augment.kind: unknown '{cfg.kind}' (known: {', '.join(PARAM_NAMES)})")
        self.cfg, self.height, self.width = cfg, image_shape[-2], image_shape[-1]
        source_shape = tuple(image_shape if source_shape is None else source_shape)
        self.source_height, self.source_width = source_shape[-2], source_shape[-1]
        if self.source_height < self.height or self.source_width < self.width:
            raise ValueError(f"source pixels {source_shape} are smaller than the views {tuple(image_shape)}")
        self.crops = (self.source_height, self.source_width) != (self.height, self.width)
        self.centre = centre_offsets(self.source_height, self.source_width, self.height, self.width)
        self.frames = len(image_shape) == 4
        # Bounds that need the image size, for the kind that uses each. A pad beyond the image's
        # larger side only adds zeros (and pad 200000 would allocate a 640 GB canvas); a circular
        # roll by a whole side or more repeats smaller rolls.
        if cfg.kind == "pad_crop_flip" and cfg.pad > max(self.height, self.width):
            raise ConfigError(f"augment.pad must be <= {max(self.height, self.width)} (the images' larger side), "
                              f"got {cfg.pad}")
        if cfg.kind == "event_flip_roll" and cfg.max_roll >= min(self.height, self.width):
            raise ConfigError(f"augment.max_roll must be < {min(self.height, self.width)} (the images' side), "
                              f"got {cfg.max_roll}")
        if self.frames and (cfg.randaugment or cfg.erasing > 0):
            raise ConfigError("augment.randaugment and augment.erasing work on images, not event frames "
                              "(timm's RandAugment and RandomErasing); turn them off for this dataset")
        if cfg.randaugment and image_shape[-3] not in (1, 3):
            raise ConfigError(f"augment.randaugment needs 1- or 3-channel images, these have {image_shape[-3]}")
        channels = image_shape[-3]  # without a normalization: pixel = raw * scale
        self.mean = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float32).flatten().expand(channels)
        self.std = torch.as_tensor(1.0 if std is None else std, dtype=torch.float32).flatten().expand(channels)
        self.mean, self.std = self.mean.reshape(-1, 1, 1), self.std.reshape(-1, 1, 1)
        self.scale = scale
        self.randaugment, self.erasing = recipe_transforms(cfg, image_shape, self.mean.flatten().tolist(), scale)
        self.has_recipe = bool(cfg.randaugment) or cfg.erasing > 0
        self.base_size = len(PARAM_NAMES[cfg.kind])
        self.own_size = self.base_size + (len(RECIPE) if self.has_recipe else 0)
        self.mixes = cfg.mixup > 0 or cfg.cutmix > 0
        self._identity = self.identity().tolist()

    @property
    def param_names(self) -> tuple[str, ...]:
        own = PARAM_NAMES[self.cfg.kind] + (RECIPE if self.has_recipe else ())
        return own + ((*MIX, *(f"p_{name}" for name in own)) if self.mixes else ())

    def spec(self) -> dict:
        """What identifies these views in a store manifest (mix_off_epoch is training-side only)."""
        spec = dataclasses.asdict(self.cfg)
        del spec["mix_off_epoch"]
        if self.cfg.randaugment:  # its ops are timm's: another timm may draw other ops from the same seed
            from importlib.metadata import version

            spec["timm"] = version("timm")
        return {**spec, "param_names": list(self.param_names)}

    def identity(self) -> np.ndarray:
        kind, h, w = self.cfg.kind, self.height, self.width
        base = {"none": [0], "pad_crop_flip": [self.cfg.pad, self.cfg.pad, 0],
                "resized_crop_flip": [*self.centre, h, w, 0], "event_flip_roll": [0, 0, 0]}[kind]
        own = base + ([-1] if self.has_recipe else [])  # recipe seed -1: no RandAugment, no erasing
        return np.asarray(own + ([0, -1, 0, 0, 0, 0, 0] + own if self.mixes else []), np.int32)

    def mixed_views(self, views: int) -> range:
        """The cached views that are mixed: the last `augment.mix_views` of the K (never view 0)."""
        return range(max(1, views - self.cfg.mix_views), views) if self.mixes else range(0)

    def draw(self, indices: np.ndarray, views: int, num_samples: int | None = None) -> np.ndarray:
        """The cached views' parameters, (len(indices), views, P) int32; view 0 is the identity.
        `num_samples` (the split's size) bounds the mix partners."""
        out = np.empty((len(indices), views, len(self.param_names)), np.int32)
        out[:, 0] = self.identity()
        mixed = self.mixed_views(views)
        for row, index in enumerate(np.asarray(indices, dtype=np.int64)):
            for v in range(1, views):
                rng = np.random.default_rng([self.cfg.seed, 0, int(index), v])
                out[row, v] = self._draw_view(rng, int(index), v in mixed, num_samples)
        return out

    def draw_online(self, indices: np.ndarray, epoch: int, num_samples: int | None = None,
                    mix: bool = False) -> np.ndarray:
        """Fresh parameters for one epoch of online augmentation, (len(indices), P) int32."""
        return np.asarray([self._draw_view(np.random.default_rng([self.cfg.seed, 1 + epoch, int(index), 1]),
                                           int(index), mix, num_samples)
                           for index in np.asarray(indices, dtype=np.int64)], np.int32).reshape(len(indices), -1)

    def _draw_view(self, rng: np.random.Generator, index: int, mix: bool, num_samples: int | None) -> list[int]:
        own = self._draw_own(rng)
        if not self.mixes:
            return own
        if not mix:
            return own + [0, -1, 0, 0, 0, 0, 0] + self._identity[:self.own_size]
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
        return own + [CUTMIX if use_cutmix else MIXUP, partner, lam_bits, *box] + self._draw_own(rng)

    def _draw_own(self, rng: np.random.Generator) -> list[int]:
        return self._draw_base(rng) + ([int(rng.integers(0, 2**31 - 1))] if self.has_recipe else [])

    def _draw_base(self, rng: np.random.Generator) -> list[int]:
        cfg = self.cfg
        flip = int(cfg.flip and rng.random() < 0.5)
        if cfg.kind == "pad_crop_flip":
            top, left = rng.integers(0, 2 * cfg.pad + 1, size=2)
            return [int(top), int(left), flip]
        if cfg.kind == "event_flip_roll":
            dy, dx = rng.integers(-cfg.max_roll, cfg.max_roll + 1, size=2)
            return [int(dy), int(dx), flip]
        if cfg.kind == "resized_crop_flip":
            # torchvision's own RandomResizedCrop sampling, on a torch RNG seeded from this view, in the source image.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(0, 2**62)))
                top, left, height, width = T.RandomResizedCrop.get_params(
                    torch.empty(1, self.source_height, self.source_width), list(cfg.scale), list(cfg.ratio))
            return [top, left, height, width, flip]
        return [0]

    # -- applying -------------------------------------------------------------------------------

    def partners(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """The partner sample of each view in `params` (B, P); -1 where the view is not mixed."""
        params = np.asarray(params)
        if not self.mixes:
            return np.full(len(params), -1, np.int64)
        mode, partner = params[:, self.own_size], params[:, self.own_size + 1]
        return np.where(mode > 0, partner, -1).astype(np.int64)

    def lam(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B,) float32: the weight of the sample's own pixels in each view (1 where not mixed)."""
        params = np.asarray(params)
        if not self.mixes:
            return np.ones(len(params), np.float32)
        mode = params[:, self.own_size]
        lam = np.ascontiguousarray(params[:, self.own_size + 2], dtype=np.int32).view(np.float32)
        return np.where(mode > 0, lam, np.float32(1.0)).astype(np.float32)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(raw * scale - mean) / std as float32, as `ImageSplit` normalizes (the same operations, in place)."""
        return raw.to(torch.float32, copy=True).mul_(self.scale).sub_(self.mean).div_(self.std)

    def apply(self, images: torch.Tensor, params: np.ndarray | torch.Tensor,
              partners: torch.Tensor | None = None) -> torch.Tensor:
        """The normalized views of a batch, (B, *image_shape) float32: images (B, ..., H, W) the raw source
        values, params (B, P); `partners` (B, ..., H, W): the raw source values of each row's partner sample
        (`partners(params)`), needed where a view is mixed. The identity is the normalized centre crop.

        The raw views are built per sample, then normalized as one batch (elementwise, so bit for bit
        what per-sample normalization gives), then erased and mixed per sample."""
        if self.cfg.kind == "none" and not self.has_recipe and not self.mixes:
            return self.normalize(self.centre_crop(images))
        params = torch.as_tensor(params).tolist()
        out = self._views(images, [p[:self.own_size] for p in params])
        mixed = [b for b, p in enumerate(params) if self.mixes and p[self.own_size] > 0]
        if mixed:
            if partners is None:
                raise ValueError("a mixed view needs its partner's pixels (partners=...)")
            others = self._views(partners[mixed], [params[b][self.own_size + len(MIX):] for b in mixed])
            for other, b in zip(others, mixed):
                out[b] = self._mix(out[b], other, params[b][self.own_size:self.own_size + len(MIX)])
        return out

    def _views(self, images: torch.Tensor, own: list[list[int]]) -> torch.Tensor:
        """Unmixed normalized views (B, *image_shape): the base and RandAugment on each raw image, the
        normalization of the batch, then each view's erasing."""
        raws = []
        for image, p in zip(images, own):
            raw = self._apply_base(image, p[:self.base_size])
            if self.has_recipe and p[self.base_size] >= 0 and self.randaugment is not None:
                raw = self._randaugment(raw, p[self.base_size])
            raws.append(raw)
        out = self.normalize(torch.stack(raws))
        if self.erasing is not None:
            for b, p in enumerate(own):
                if p[self.base_size] >= 0:
                    with seeded(p[self.base_size] + 1):
                        self.erasing(out[b])  # in place
        return out

    def _mix(self, own: torch.Tensor, other: torch.Tensor, m: list[int]) -> torch.Tensor:
        mode, _, lam_bits, top, left, height, width = m
        if mode == CUTMIX:
            mixed = own.clone()
            mixed[..., top:top + height, left:left + width] = other[..., top:top + height, left:left + width]
            return mixed
        lam = torch.tensor(np.int32(lam_bits).view(np.float32).item(), dtype=own.dtype)
        return own * lam + other * (1 - lam)

    def _apply_own(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        """One unmixed view of one raw image, normalized."""
        return self._views(image[None], [p])[0]

    def _randaugment(self, raw: torch.Tensor, seed: int) -> torch.Tensor:
        """timm's RandAugment on the uint8 image (C, H, W), under generators seeded from `seed`."""
        from PIL import Image

        if raw.dtype != torch.uint8:
            raise ConfigError(f"augment.randaugment needs uint8 images, these are {raw.dtype}")
        array = raw.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        with seeded(seed):
            pil = self.randaugment(pil)
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).reshape(*array.shape).permute(2, 0, 1)

    def centre_crop(self, images: torch.Tensor) -> torch.Tensor:
        """The input-sized centre crop of source pixels (..., H, W): the clean input."""
        return centre_crop(images, self.height, self.width) if self.crops else images

    def _apply_base(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        kind, h, w = self.cfg.kind, self.height, self.width
        if kind == "resized_crop_flip":  # a box of the source image, resized to the input size
            top, left, height, width, flip = p
            if (height, width) == (h, w):  # no resize: the crop itself, bit for bit (the identity among them)
                out = image[..., top:top + h, left:left + w]
            else:
                out = TF.resized_crop(image, top, left, height, width, [h, w], antialias=True)
            return out.flip(-1) if flip else out
        image = self.centre_crop(image)
        if kind == "none" or p == self._identity[:self.base_size]:
            return image  # the clean input, bit for bit
        if kind == "pad_crop_flip":
            top, left, flip = p
            pad = self.cfg.pad  # zero padding of the raw image: black, as torchvision pads
            canvas = image.new_zeros(*image.shape[:-2], h + 2 * pad, w + 2 * pad)
            canvas[..., pad:pad + h, pad:pad + w] = image
            out = canvas[..., top:top + h, left:left + w]
        else:  # event_flip_roll
            dy, dx, flip = p
            out = torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
        return out.flip(-1) if flip else out

    # -- targets --------------------------------------------------------------------------------

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


def view_schedule(num_samples: int, views: int, epoch: int, seed: int, mixed: range = range(0),
                  mix_off_epoch: int = 0) -> np.ndarray:
    """The view each sample trains on in `epoch`: view (o_i + epoch) mod K' of a pool of K' views,
    o_i seeded per sample. The pool is every view, or with mixed views (`mixed`, a range of the K)
    the mixed ones until `mix_off_epoch` (0: never off) and the unmixed ones from then on, as
    timm's recipe stops mixing at an epoch. Over any K' consecutive epochs of one pool every
    sample visits each of its views exactly once.
    """
    pool = range(views)
    if len(mixed):
        pool = mixed if (mix_off_epoch == 0 or epoch < mix_off_epoch) else range(mixed.start)
    offsets = np.random.default_rng([seed, 0x5EED]).integers(0, len(pool), size=num_samples)
    return pool.start + (offsets + epoch) % len(pool)


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


def view_augmenter(cfg: AugmentConfig, split) -> ViewAugmenter:
    """The augmenter for an `ImageSplit`: its input and source shapes and its normalization."""
    return ViewAugmenter(cfg, tuple(split.image_shape), mean=split.mean, std=split.std, scale=split.scale,
                         source_shape=tuple(split.source_shape))
