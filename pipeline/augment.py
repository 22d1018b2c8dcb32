"""Augmented views that extraction and training rebuild identically.

A *view* of sample i is the input after an augmentation whose parameters are a pure function
of (augment.seed, i, view index v). View 0 is always the clean input. Extraction draws the
parameters, stores them beside the teacher's targets, and feeds the teacher
`apply(images, params)`; training reads the stored parameters and rebuilds the very same
tensor for the student. Parameters are small integer vectors, one layout per kind:

  pad_crop_flip       (top, left, flip)             crop of the image zero-padded by `pad` (raw 0)
  resized_crop_flip   (top, left, height, width, flip)   RandomResizedCrop box, resized back
  event_flip_roll     (dy, dx, flip)                circular shift of event frames, then flip
  none                (identity,)                   always 0: every view is the clean input

Parameters are drawn from `numpy.random.default_rng([seed, stream, index, view])`: stream 0
holds the cached views; `bkd train-student` with `student.augment: online` draws fresh ones
from stream 1 + epoch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from pipeline.config import AugmentConfig
from pipeline.errors import ConfigError

PARAM_NAMES = {
    "none": ("identity",),
    "pad_crop_flip": ("top", "left", "flip"),
    "resized_crop_flip": ("top", "left", "height", "width", "flip"),
    "event_flip_roll": ("dy", "dx", "flip"),
}


class ViewAugmenter:
    """Draws and applies the views of one dataset's inputs (shape (C, H, W) or (T, C, H, W))."""

    def __init__(self, cfg: AugmentConfig, image_shape: tuple[int, ...], fill: torch.Tensor | None = None):
        if cfg.kind not in PARAM_NAMES:  # also checked by config validation; here for direct use
            raise ConfigError(f"augment.kind: unknown '{cfg.kind}' (known: {', '.join(PARAM_NAMES)})")
        self.cfg, self.height, self.width = cfg, image_shape[-2], image_shape[-1]
        # Bounds that need the image size, for the kind that uses each. A pad beyond the image's
        # larger side only adds zeros (and pad 200000 would allocate a 640 GB canvas); a circular
        # roll by a whole side or more repeats smaller rolls.
        if cfg.kind == "pad_crop_flip" and cfg.pad > max(self.height, self.width):
            raise ConfigError(f"augment.pad must be <= {max(self.height, self.width)} (the images' larger side), "
                              f"got {cfg.pad}")
        if cfg.kind == "event_flip_roll" and cfg.max_roll >= min(self.height, self.width):
            raise ConfigError(f"augment.max_roll must be < {min(self.height, self.width)} (the images' side), "
                              f"got {cfg.max_roll}")
        # What padding writes, per channel, in the normalized space the images live in: the
        # normalized value of raw 0 (black), as torchvision pads raw images. None: 0.
        self.fill = fill
        self._identity = self.identity().tolist()

    @property
    def param_names(self) -> tuple[str, ...]:
        return PARAM_NAMES[self.cfg.kind]

    def spec(self) -> dict:
        """What identifies these views in a store manifest."""
        spec = dataclasses.asdict(self.cfg)
        del spec["mixup"], spec["cutmix"]  # training-side only: they never reach the teacher
        return {**spec, "param_names": list(self.param_names)}

    def identity(self) -> np.ndarray:
        kind, h, w = self.cfg.kind, self.height, self.width
        return np.asarray({"none": [0], "pad_crop_flip": [self.cfg.pad, self.cfg.pad, 0],
                           "resized_crop_flip": [0, 0, h, w, 0], "event_flip_roll": [0, 0, 0]}[kind], np.int32)

    def draw(self, indices: np.ndarray, views: int) -> np.ndarray:
        """The cached views' parameters, (len(indices), views, P) int32; view 0 is the identity."""
        out = np.empty((len(indices), views, len(self.param_names)), np.int32)
        out[:, 0] = self.identity()
        for row, index in enumerate(np.asarray(indices, dtype=np.int64)):
            for v in range(1, views):
                out[row, v] = self._draw_one(np.random.default_rng([self.cfg.seed, 0, int(index), v]))
        return out

    def target_classes(self, labels: np.ndarray, view_params: np.ndarray) -> np.ndarray:
        """The classes each view's training target is made of, (n, V, 2) int64: for now every view
        is one sample's, so both are its label (a mixed view's second is its partner's label)."""
        labels = np.asarray(labels, dtype=np.int64)
        views = np.asarray(view_params).shape[1]
        return np.broadcast_to(labels[:, None, None], (len(labels), views, 2)).copy()

    def draw_online(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        """Fresh parameters for one epoch of online augmentation, (len(indices), P) int32."""
        return np.asarray([self._draw_one(np.random.default_rng([self.cfg.seed, 1 + epoch, int(index), 1]))
                           for index in np.asarray(indices, dtype=np.int64)], np.int32).reshape(len(indices), -1)

    def _draw_one(self, rng: np.random.Generator) -> list[int]:
        cfg, h, w = self.cfg, self.height, self.width
        flip = int(cfg.flip and rng.random() < 0.5)
        if cfg.kind == "pad_crop_flip":
            top, left = rng.integers(0, 2 * cfg.pad + 1, size=2)
            return [top, left, flip]
        if cfg.kind == "event_flip_roll":
            dy, dx = rng.integers(-cfg.max_roll, cfg.max_roll + 1, size=2)
            return [dy, dx, flip]
        if cfg.kind == "resized_crop_flip":
            # torchvision's own RandomResizedCrop sampling, on a torch RNG seeded from this view.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(0, 2**62)))
                top, left, height, width = T.RandomResizedCrop.get_params(
                    torch.empty(1, h, w), list(cfg.scale), list(cfg.ratio))
            return [top, left, height, width, flip]
        return [0]

    def apply(self, images: torch.Tensor, params: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The views of a batch: images (B, ..., H, W), params (B, P)."""
        if self.cfg.kind == "none":
            return images
        params = torch.as_tensor(params).tolist()
        return torch.stack([self._apply_one(image, p) for image, p in zip(images, params)])

    def _apply_one(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        if p == self._identity:
            return image  # the clean input, bit for bit
        kind, h, w = self.cfg.kind, self.height, self.width
        if kind == "pad_crop_flip":
            top, left, flip = p
            pad = self.cfg.pad
            fill = torch.zeros(image.shape[-3]) if self.fill is None else self.fill
            canvas = fill.to(image.dtype).view(-1, 1, 1).expand(*image.shape[:-2], h + 2 * pad, w + 2 * pad).clone()
            canvas[..., pad:pad + h, pad:pad + w] = image
            out = canvas[..., top:top + h, left:left + w]
        elif kind == "event_flip_roll":
            dy, dx, flip = p
            out = torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
        else:  # resized_crop_flip
            top, left, height, width, flip = p
            out = TF.resized_crop(image, top, left, height, width, [h, w], antialias=True)
        return out.flip(-1) if flip else out


def view_schedule(num_samples: int, views: int, epoch: int, seed: int) -> np.ndarray:
    """The view each sample trains on in `epoch`: (o_i + epoch) mod K, o_i seeded per sample.

    Over any K consecutive epochs every sample visits each of its K views exactly once.
    """
    offsets = np.random.default_rng([seed, 0x5EED]).integers(0, views, size=num_samples)
    return (offsets + epoch) % views


def view_augmenter(cfg: AugmentConfig, split) -> ViewAugmenter:
    """The augmenter for an `ImageSplit`: its image shape, padding with its normalized black."""
    return ViewAugmenter(cfg, tuple(split.image_shape), fill=split.black)
