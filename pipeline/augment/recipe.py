"""timm's training recipe on a view: RandAugment on the raw uint8 image, RandomErasing on the normalized
tensor, each run under generators seeded from the view's recipe seed.

A view with a recipe has one more field, `recipe_seed` (`RECIPE`; -1: no recipe for this view, as the
clean input). RandAugment runs with Python's, NumPy's and torch's global generators seeded from it,
erasing from it + 1 (`seeded`, which restores them afterwards), so the op choices, magnitudes with
noise, signs, boxes and fills are a pure function of the stored seed -- the ops are timm's, not a
copy of them.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from pipeline.config import AugmentConfig
from pipeline.errors import ConfigError, clip

RECIPE = ("recipe_seed",)
MAX_MAGNITUDE = 9.99  # RandAugment's magnitude cap (timm's is 10; see recipe_transforms)


def has_recipe(cfg: AugmentConfig) -> bool:
    return bool(cfg.randaugment) or cfg.erasing > 0


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


def apply_randaugment(randaugment, raw: torch.Tensor, seed: int) -> torch.Tensor:
    """timm's `randaugment` on the uint8 image `raw` (C, H, W), under generators seeded from `seed`."""
    from PIL import Image

    if raw.dtype != torch.uint8:
        raise ConfigError(f"augment.randaugment needs uint8 images, these are {raw.dtype}")
    array = raw.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with seeded(seed):
        pil = randaugment(pil)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).reshape(*array.shape).permute(2, 0, 1)


def apply_erasing(erasing, view: torch.Tensor, seed: int) -> None:
    """timm's `erasing` on the normalized view (C, H, W), in place, under generators seeded from `seed` + 1."""
    with seeded(seed + 1):
        erasing(view)
