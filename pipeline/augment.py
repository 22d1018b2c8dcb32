"""Augmented views that extraction and training rebuild identically.

A *view* of sample i is the input after an augmentation whose parameters are a pure function
of (augment.seed, i, view index v). View 0 is always the clean input. Extraction draws the
parameters, stores them beside the teacher's targets, and feeds the teacher
`apply(images, params, partners)`; training reads the stored parameters and rebuilds the very
same tensor for the student. Parameters are small int32 vectors whose fields `ParamLayout` names.

Views are cut from the split's source pixels, which for ImageNet with `data.load_size` are larger
than the input (`Geometry`): a RandomResizedCrop box lies in the source image and is resized to
the input size, every other base works on the input-sized centre crop, and the clean input (the
identity) is that centre crop. A view is built in the order of timm's training transform:

1. the geometric base, one `Kind` per `augment.kind` (`KINDS`), with its own fields:
     pad_crop_flip       (top, left, flip)             crop of the image zero-padded by `pad` (raw 0)
     resized_crop_flip   (top, left, height, width, flip)   RandomResizedCrop box, resized back
     event_flip_roll     (dy, dx, flip)                circular shift of event frames, then flip
     none                (identity,)                   always 0: every view is the clean input
2. the recipe (`recipe_seed`, with `augment.randaugment` or `augment.erasing`): timm's own
   RandAugment on the uint8 image, then timm's RandomErasing on the normalized tensor, each run
   with Python's, NumPy's and torch's generators seeded from the view's recipe seed (and restored
   afterwards), so their op choices, magnitudes with noise, signs, boxes and fills are a pure
   function of the stored seed -- the ops are timm's, not a copy of them;
3. the mix (`mix_views` of the K views, the last ones): mixup or cutmix with a partner sample, the
   `Mix` fields followed by the partner's own fields (p_*): the partner's view is rebuilt from its
   pixels exactly as the sample's, and the mixed view is lam * own + (1 - lam) * partner (mixup) or
   the partner's pixels inside the box (cutmix, lam = 1 - box area / image area, timm's corrected
   lam). `lam_bits` holds the float32 lam bit for bit.

Parameters are drawn from `numpy.random.default_rng([seed, stream, index, view])`: stream 0
holds the cached views; `bkd train-student` with `student.augment: online` draws fresh ones
from stream 1 + epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from pipeline.config import AugmentConfig
from pipeline.data import centre_crop, centre_offsets
from pipeline.errors import ConfigError, clip

RECIPE = ("recipe_seed",)
MAX_MAGNITUDE = 9.99  # RandAugment's magnitude cap (timm's is 10; see recipe_transforms)
MIXUP, CUTMIX = 1, 2  # values of the `mix` field (0: not mixed)


class Mix(NamedTuple):
    """The mix fields of one view, or (`of`) columns of them for a batch of parameter vectors."""

    mix: int  # 0: not mixed, MIXUP or CUTMIX
    partner: int  # the partner sample, -1 when not mixed
    lam_bits: int  # the float32 weight of the sample's own pixels, bit for bit
    box_top: int  # the cutmix box, all 0 for mixup
    box_left: int
    box_height: int
    box_width: int


MIX = Mix._fields
UNMIXED = Mix(0, -1, 0, 0, 0, 0, 0)


# -- geometric bases --------------------------------------------------------------------------------


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


# -- the parameter vector ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ParamLayout:
    """Named slices of a view's parameter vector, in its order: `base` (the kind's fields), `recipe` (the
    recipe seed), `mix` (the `Mix` fields) and `partner` (the partner's base and recipe fields), each empty
    where the config has no such part. `own` (base and recipe) indexes a view's own fields and, as
    `base` and `recipe` do, the partner's fields taken out by `partner`."""

    names: tuple[str, ...]
    sections: dict[str, slice]

    @classmethod
    def of(cls, cfg: AugmentConfig) -> ParamLayout:
        if cfg.kind not in KINDS:  # also checked by config validation; here for direct use
            raise ConfigError(f"augment.kind: unknown '{cfg.kind}' (known: {', '.join(KINDS)})")
        recipe = RECIPE if has_recipe(cfg) else ()
        own = KINDS[cfg.kind].fields + recipe
        parts = {"base": KINDS[cfg.kind].fields, "recipe": recipe, "mix": MIX if mixes(cfg) else (),
                 "partner": tuple(f"p_{name}" for name in own) if mixes(cfg) else ()}
        sections, start = {}, 0
        for name, fields in parts.items():
            sections[name] = slice(start, start + len(fields))
            start += len(fields)
        return cls(tuple(name for fields in parts.values() for name in fields), sections)

    def __getitem__(self, name: str) -> slice:
        if name == "own":
            return slice(self.sections["base"].start, self.sections["recipe"].stop)
        return self.sections[name]

    def __len__(self) -> int:
        return len(self.names)

    def to_manifest(self) -> dict[str, list[int]]:
        """{section: [start, stop]}: how a store records the layout of its view_params."""
        return {name: [s.start, s.stop] for name, s in self.sections.items()}


def has_recipe(cfg: AugmentConfig) -> bool:
    return bool(cfg.randaugment) or cfg.erasing > 0


def mixes(cfg: AugmentConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0


# -- timm's recipe ----------------------------------------------------------------------------------


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


# -- views ------------------------------------------------------------------------------------------


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
        self.cfg, self.layout = cfg, ParamLayout.of(cfg)
        source_shape = tuple(image_shape if source_shape is None else source_shape)
        self.geometry = Geometry(image_shape[-2], image_shape[-1], source_shape[-2], source_shape[-1])
        self.height, self.width = self.geometry.height, self.geometry.width
        if source_shape[-2] < self.height or source_shape[-1] < self.width:
            raise ValueError(f"source pixels {source_shape} are smaller than the views {tuple(image_shape)}")
        self.kind = KINDS[cfg.kind](cfg, self.geometry)
        if len(image_shape) == 4 and has_recipe(cfg):
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
        self.has_recipe, self.mixes = has_recipe(cfg), mixes(cfg)
        self._identity = self.identity().tolist()

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.layout.names

    def spec(self) -> dict:
        """What identifies these views in a store manifest (mix_off_epoch is training-side only)."""
        spec = dataclasses.asdict(self.cfg)
        del spec["mix_off_epoch"]
        if self.cfg.randaugment:  # its ops are timm's: another timm may draw other ops from the same seed
            from importlib.metadata import version

            spec["timm"] = version("timm")
        return {**spec, "param_names": list(self.param_names), "view_layout": self.layout.to_manifest()}

    def identity(self) -> np.ndarray:
        own = self.kind.identity() + ([-1] if self.has_recipe else [])  # recipe seed -1: no RandAugment, no erasing
        return np.asarray(own + ([*UNMIXED, *own] if self.mixes else []), np.int32)

    def centre_crop(self, images: torch.Tensor) -> torch.Tensor:
        """The input-sized centre crop of source pixels (..., H, W): the clean input."""
        return self.geometry.centre_crop(images)

    # -- drawing --------------------------------------------------------------------------------

    def mixed_views(self, views: int) -> range:
        """The cached views that are mixed: the last `augment.mix_views` of the K (never view 0)."""
        return range(max(1, views - self.cfg.mix_views), views) if self.mixes else range(0)

    def draw(self, indices: np.ndarray, views: int, num_samples: int | None = None) -> np.ndarray:
        """The cached views' parameters, (len(indices), views, P) int32; view 0 is the identity.
        `num_samples` (the split's size) bounds the mix partners."""
        out = np.empty((len(indices), views, len(self.layout)), np.int32)
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
            return own + [*UNMIXED] + self._identity[self.layout["own"]]
        return own + [*self._draw_mix(rng, index, num_samples)] + self._draw_own(rng)

    def _draw_own(self, rng: np.random.Generator) -> list[int]:
        return self.kind.draw(rng) + ([int(rng.integers(0, 2**31 - 1))] if self.has_recipe else [])

    def _draw_mix(self, rng: np.random.Generator, index: int, num_samples: int | None) -> Mix:
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

    # -- applying -------------------------------------------------------------------------------

    def mix_fields(self, params: np.ndarray | torch.Tensor) -> Mix:
        """The mix fields of `params` (B, P), one column each; UNMIXED's values without mixing."""
        params = np.asarray(params)
        if not self.mixes:
            return Mix(*(np.full(len(params), value, np.int32) for value in UNMIXED))
        return Mix(*params[:, self.layout["mix"]].T)

    def partners(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """The partner sample of each view in `params` (B, P); -1 where the view is not mixed."""
        m = self.mix_fields(params)
        return np.where(m.mix > 0, m.partner, -1).astype(np.int64)

    def lam(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B,) float32: the weight of the sample's own pixels in each view (1 where not mixed)."""
        m = self.mix_fields(params)
        lam = np.ascontiguousarray(m.lam_bits, dtype=np.int32).view(np.float32)
        return np.where(m.mix > 0, lam, np.float32(1.0)).astype(np.float32)

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
        if isinstance(self.kind, NoAugment) and not self.has_recipe and not self.mixes:
            return self.normalize(self.centre_crop(images))
        params = torch.as_tensor(params).tolist()
        out = self._views(images, [p[self.layout["own"]] for p in params])
        mix = [Mix(*p[self.layout["mix"]]) if self.mixes else UNMIXED for p in params]
        mixed = [b for b, m in enumerate(mix) if m.mix > 0]
        if mixed:
            if partners is None:
                raise ValueError("a mixed view needs its partner's pixels (partners=...)")
            others = self._views(partners[mixed], [params[b][self.layout["partner"]] for b in mixed])
            for other, b in zip(others, mixed):
                out[b] = self._mix(out[b], other, mix[b])
        return out

    def _views(self, images: torch.Tensor, own: list[list[int]]) -> torch.Tensor:
        """Unmixed normalized views (B, *image_shape) from each row's own fields: the base and RandAugment
        on each raw image, the normalization of the batch, then each view's erasing."""
        raws = []
        for image, p in zip(images, own):
            raw = self.kind.apply(image, p[self.layout["base"]])
            seed = self._recipe_seed(p)
            if seed >= 0 and self.randaugment is not None:
                raw = self._randaugment(raw, seed)
            raws.append(raw)
        out = self.normalize(torch.stack(raws))
        if self.erasing is not None:
            for b, p in enumerate(own):
                seed = self._recipe_seed(p)
                if seed >= 0:
                    with seeded(seed + 1):
                        self.erasing(out[b])  # in place
        return out

    def _recipe_seed(self, own: list[int]) -> int:
        """The recipe seed of a view's own fields; -1 (no recipe) without one."""
        (seed,) = own[self.layout["recipe"]] or [-1]
        return seed

    def _mix(self, own: torch.Tensor, other: torch.Tensor, m: Mix) -> torch.Tensor:
        if m.mix == CUTMIX:
            top, left, height, width = m.box_top, m.box_left, m.box_height, m.box_width
            mixed = own.clone()
            mixed[..., top:top + height, left:left + width] = other[..., top:top + height, left:left + width]
            return mixed
        lam = torch.tensor(np.int32(m.lam_bits).view(np.float32).item(), dtype=own.dtype)
        return own * lam + other * (1 - lam)

    def _apply_own(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        """One unmixed view of one raw image from its own fields, normalized."""
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
