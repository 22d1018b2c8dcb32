"""The geometric bases of views: one `Kind` per `augment.kind`, registered in `KINDS`.

A kind names its int fields (`fields`, also `PARAM_NAMES[kind]`), says their clean-input values
(`identity`), draws them from a view's generator (`draw`, the flip first, used or not) and applies
them to one raw source image (`apply`). `Geometry` holds the views' size and that of the source
pixels they are cut from (larger for ImageNet with `data.load_size`): a RandomResizedCrop box lies
in the source image and is resized to the input size, every other kind works on the input-sized
centre crop, and the clean input is that centre crop.

    pad_crop_flip       (top, left, flip)                  crop of the image zero-padded by `pad` (raw 0)
    resized_crop_flip   (top, left, height, width, flip)   RandomResizedCrop box, resized back
    event_flip_roll     (dy, dx, flip)                     circular shift of event frames, then flip
    none                (identity,)                        always 0: every view is the clean input
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from pipeline.config import AugmentConfig
from pipeline.data import centre_crop, centre_offsets
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Geometry:
    """The views' height and width, and those of the source pixels they are cut from."""

    height: int
    width: int
    source_height: int
    source_width: int

    @property
    def crops(self) -> bool:
        return (self.source_height, self.source_width) != (self.height, self.width)

    @property
    def centre(self) -> tuple[int, int]:
        return centre_offsets(self.source_height, self.source_width, self.height, self.width)

    def centre_crop(self, images: torch.Tensor) -> torch.Tensor:
        """The input-sized centre crop of source pixels (..., H, W): the clean input."""
        return centre_crop(images, self.height, self.width) if self.crops else images


class Kind:
    """One geometric base: its fields, their clean-input values, drawing them, and applying them to one
    raw source image (..., H, W). Every kind draws its flip first, used or not."""

    fields: tuple[str, ...] = ()

    def __init__(self, cfg: AugmentConfig, geometry: Geometry):
        self.cfg, self.geometry = cfg, geometry

    def identity(self) -> list[int]:
        raise NotImplementedError

    def draw(self, rng: np.random.Generator) -> list[int]:
        raise NotImplementedError

    def apply(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def flip(self, rng: np.random.Generator) -> int:
        return int(self.cfg.flip and rng.random() < 0.5)


class NoAugment(Kind):
    """Every view is the clean input."""

    fields = ("identity",)

    def identity(self) -> list[int]:
        return [0]

    def draw(self, rng: np.random.Generator) -> list[int]:
        self.flip(rng)  # drawn all the same: the recipe seed is drawn after it
        return [0]

    def apply(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        return self.geometry.centre_crop(image)


class PadCropFlip(Kind):
    """A crop of the input size from the image zero-padded by `pad` (raw 0: black, as torchvision pads)."""

    fields = ("top", "left", "flip")

    def __init__(self, cfg: AugmentConfig, geometry: Geometry):
        super().__init__(cfg, geometry)
        # A pad beyond the image's larger side only adds zeros (and pad 200000 would allocate a 640 GB canvas).
        side = max(geometry.height, geometry.width)
        if cfg.pad > side:
            raise ConfigError(f"augment.pad must be <= {side} (the images' larger side), got {cfg.pad}")

    def identity(self) -> list[int]:
        return [self.cfg.pad, self.cfg.pad, 0]

    def draw(self, rng: np.random.Generator) -> list[int]:
        flip = self.flip(rng)
        top, left = rng.integers(0, 2 * self.cfg.pad + 1, size=2)
        return [int(top), int(left), flip]

    def apply(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        image = self.geometry.centre_crop(image)
        if p == self.identity():
            return image  # the clean input, bit for bit
        top, left, flip = p
        h, w, pad = self.geometry.height, self.geometry.width, self.cfg.pad
        canvas = image.new_zeros(*image.shape[:-2], h + 2 * pad, w + 2 * pad)
        canvas[..., pad:pad + h, pad:pad + w] = image
        out = canvas[..., top:top + h, left:left + w]
        return out.flip(-1) if flip else out


class ResizedCropFlip(Kind):
    """torchvision's RandomResizedCrop box in the source image, resized to the input size."""

    fields = ("top", "left", "height", "width", "flip")

    def identity(self) -> list[int]:
        return [*self.geometry.centre, self.geometry.height, self.geometry.width, 0]

    def draw(self, rng: np.random.Generator) -> list[int]:
        flip = self.flip(rng)
        g = self.geometry  # torchvision's own sampling, on a torch RNG seeded from this view
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(0, 2**62)))
            top, left, height, width = T.RandomResizedCrop.get_params(
                torch.empty(1, g.source_height, g.source_width), list(self.cfg.scale), list(self.cfg.ratio))
        return [top, left, height, width, flip]

    def apply(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        top, left, height, width, flip = p
        h, w = self.geometry.height, self.geometry.width
        if (height, width) == (h, w):  # no resize: the crop itself, bit for bit (the identity among them)
            out = image[..., top:top + h, left:left + w]
        else:
            out = TF.resized_crop(image, top, left, height, width, [h, w], antialias=True)
        return out.flip(-1) if flip else out


class EventFlipRoll(Kind):
    """A circular shift of event frames by (dy, dx) in [-max_roll, max_roll], then the flip."""

    fields = ("dy", "dx", "flip")

    def __init__(self, cfg: AugmentConfig, geometry: Geometry):
        super().__init__(cfg, geometry)
        side = min(geometry.height, geometry.width)  # a roll by a whole side or more repeats smaller rolls
        if cfg.max_roll >= side:
            raise ConfigError(f"augment.max_roll must be < {side} (the images' side), got {cfg.max_roll}")

    def identity(self) -> list[int]:
        return [0, 0, 0]

    def draw(self, rng: np.random.Generator) -> list[int]:
        flip = self.flip(rng)
        dy, dx = rng.integers(-self.cfg.max_roll, self.cfg.max_roll + 1, size=2)
        return [int(dy), int(dx), flip]

    def apply(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        image = self.geometry.centre_crop(image)
        if p == self.identity():
            return image
        dy, dx, flip = p
        out = torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
        return out.flip(-1) if flip else out


KINDS: dict[str, type[Kind]] = {"none": NoAugment, "pad_crop_flip": PadCropFlip,
                                "resized_crop_flip": ResizedCropFlip, "event_flip_roll": EventFlipRoll}
PARAM_NAMES = {name: kind.fields for name, kind in KINDS.items()}
