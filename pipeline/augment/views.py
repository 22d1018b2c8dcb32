"""`ViewAugmenter`: drawing the views' parameters and rebuilding the views from them; `view_schedule`.

View 0 of a sample is the clean input; the parameters of view v of sample i are drawn from
`numpy.random.default_rng([augment.seed, stream, i, v])`: stream 0 holds the cached views, and
`bkd train-student` with `student.augment: online` draws fresh ones from stream 1 + epoch. A view is
built in the order of timm's training transform: the geometric base (`kinds`) and RandAugment on the
raw image, the normalization, erasing (`recipe`), then the mix (`mix`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.augment.kinds import KINDS, Geometry, NoAugment
from pipeline.augment.layout import ParamLayout
from pipeline.augment.mix import CUTMIX, UNMIXED, Mix, Mixer, mixes
from pipeline.augment.recipe import apply_erasing, apply_randaugment, has_recipe, recipe_transforms
from pipeline.config import AugmentConfig
from pipeline.errors import ConfigError
from pipeline.rawviews import Erased, RawViews, normalize


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
        self.mixer = Mixer(cfg, self.layout["mix"], self.height, self.width)
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
        return self.mixer.mixed_views(views)

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
        return own + [*self.mixer.draw(rng, index, num_samples)] + self._draw_own(rng)

    def _draw_own(self, rng: np.random.Generator) -> list[int]:
        return self.kind.draw(rng) + ([int(rng.integers(0, 2**31 - 1))] if self.has_recipe else [])

    # -- reading the mix fields back ------------------------------------------------------------

    def mix_fields(self, params: np.ndarray | torch.Tensor) -> Mix:
        """The mix fields of `params` (B, P), one column each; UNMIXED's values without mixing."""
        return self.mixer.fields(params)

    def partners(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """The partner sample of each view in `params` (B, P); -1 where the view is not mixed."""
        return self.mixer.partners(params)

    def lam(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B,) float32: the weight of the sample's own pixels in each view (1 where not mixed)."""
        return self.mixer.lam(params)

    # -- applying -------------------------------------------------------------------------------

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(raw * scale - mean) / std as float32, as `ImageSplit` normalizes (the same operations, in place)."""
        return normalize(raw, self.scale, self.mean, self.std)

    def apply(self, images: torch.Tensor, params: np.ndarray | torch.Tensor,
              partners: torch.Tensor | None = None) -> torch.Tensor:
        """The normalized views of a batch, (B, *image_shape) float32, built here: `raw_views(...).finish()`."""
        return self.raw_views(images, params, partners).finish()

    def raw_views(self, images: torch.Tensor, params: np.ndarray | torch.Tensor,
                  partners: torch.Tensor | None = None) -> RawViews:
        """The views of a batch as they cross to the device (`RawViews`): images (B, ..., H, W) the raw source
        values, params (B, P); `partners` (B, ..., H, W): the raw source values of each row's partner sample
        (`partners(params)`), needed where a view is mixed. The identity is the centre crop.

        Each raw view is built per sample (the geometric base, then RandAugment), its erasing drawn from its
        seed; normalizing, erasing and mixing happen where the batch is finished."""
        if isinstance(self.kind, NoAugment) and not self.has_recipe and not self.mixes:
            return self._batch(self.centre_crop(images), Erased.none())
        params = torch.as_tensor(params).tolist()
        raw, erased = self._raw_views(images, [p[self.layout["own"]] for p in params])
        mix = [Mix(*p[self.layout["mix"]]) if self.mixes else UNMIXED for p in params]
        mixed = [b for b, m in enumerate(mix) if m.mix > 0]
        if not mixed:
            return self._batch(raw, erased)
        if partners is None:
            raise ValueError("a mixed view needs its partner's pixels (partners=...)")
        others, others_erased = self._raw_views(partners[mixed], [params[b][self.layout["partner"]] for b in mixed])
        if self.erasing is None:  # cutmix pastes raw pixels as it pastes normalized ones: no partner crosses
            for j, b in enumerate(mixed):
                if mix[b].mix == CUTMIX:
                    m = mix[b]
                    box = (..., slice(m.box_top, m.box_top + m.box_height), slice(m.box_left, m.box_left + m.box_width))
                    raw[b][box] = others[j][box]
            keep = [j for j, b in enumerate(mixed) if mix[b].mix != CUTMIX]
            mixed, others = [mixed[j] for j in keep], others[keep]
            if not mixed:
                return self._batch(raw, erased)
        return self._batch(raw, erased, partners=others, partner_erased=others_erased,
                           mix_rows=torch.tensor(mixed, dtype=torch.int64),
                           mix_kinds=torch.tensor([mix[b].mix for b in mixed], dtype=torch.int64),
                           mix_lam_bits=torch.tensor([mix[b].lam_bits for b in mixed], dtype=torch.int64),
                           mix_boxes=torch.tensor([[mix[b].box_top, mix[b].box_left, mix[b].box_height,
                                                    mix[b].box_width] for b in mixed], dtype=torch.int64))

    def _batch(self, raw: torch.Tensor, erased: Erased, **mix) -> RawViews:
        return RawViews(raw, self.scale, self.mean, self.std, erased, **mix)

    def _raw_views(self, images: torch.Tensor, own: list[list[int]]) -> tuple[torch.Tensor, Erased]:
        """Unmixed raw views (B, *image_shape) from each row's own fields (the base and RandAugment on each
        raw image), and the boxes each view's erasing writes."""
        raws, patches = [], []
        for b, (image, p) in enumerate(zip(images, own)):
            raw = self.kind.apply(image, p[self.layout["base"]])
            seed = self._recipe_seed(p)
            if seed >= 0 and self.randaugment is not None:
                raw = self._randaugment(raw, seed)
            raws.append(raw)
            if seed >= 0 and self.erasing is not None:
                patches += [(b, box, values) for box, values in self._erased(seed, tuple(raw.shape))]
        return torch.stack(raws), Erased.of(patches)

    def _apply_own(self, image: torch.Tensor, p: list[int]) -> torch.Tensor:
        """One unmixed view of one raw image from its own fields, normalized."""
        return self._batch(*self._raw_views(image[None], [p])).finish()[0]

    def _erased(self, seed: int, shape: tuple[int, ...]) -> list[tuple[tuple[int, int, int, int], torch.Tensor]]:
        """The (box, values) timm's erasing with `seed` writes into a view of `shape`, in order: run on a
        stand-in that records its writes (its boxes and values never depend on the view's values)."""
        canvas = _Canvas(shape)
        apply_erasing(self.erasing, canvas, seed)
        return canvas.writes

    def _recipe_seed(self, own: list[int]) -> int:
        """The recipe seed of a view's own fields; -1 (no recipe) without one."""
        (seed,) = own[self.layout["recipe"]] or [-1]
        return seed

    def _randaugment(self, raw: torch.Tensor, seed: int) -> torch.Tensor:
        """timm's RandAugment on the uint8 image (C, H, W), under generators seeded from `seed`."""
        return apply_randaugment(self.randaugment, raw, seed)

    # -- targets --------------------------------------------------------------------------------

    def targets(self, labels: torch.Tensor, params: np.ndarray | torch.Tensor, all_labels: torch.Tensor,
                num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """(B, num_classes) soft targets of the views, as timm's Mixup builds them (`Mixer.targets`)."""
        return self.mixer.targets(labels, params, all_labels, num_classes, smoothing)

    def target_classes(self, labels, view_params, all_labels=None) -> np.ndarray:
        """(n, V, 2) int64: the classes each view's training target is made of (`Mixer.target_classes`)."""
        return self.mixer.target_classes(labels, view_params, all_labels)


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


def view_augmenter(cfg: AugmentConfig, split) -> ViewAugmenter:
    """The augmenter for an `ImageSplit`: its input and source shapes and its normalization."""
    return ViewAugmenter(cfg, tuple(split.image_shape), mean=split.mean, std=split.std, scale=split.scale,
                         source_shape=tuple(split.source_shape))


class _Canvas:
    """A view (C, H, W) as timm's RandomErasing sees it -- its size and dtype -- that records the boxes
    and values erasing assigns instead of holding pixels."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape, self.dtype = torch.Size(shape), torch.float32
        self.writes: list[tuple[tuple[int, int, int, int], torch.Tensor]] = []

    def size(self) -> torch.Size:
        return self.shape

    def __setitem__(self, key, values: torch.Tensor) -> None:
        _, rows, cols = key  # img[:, top:top + h, left:left + w] = values
        self.writes.append(((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start), values))
