"""`RawViews`: a batch of views as it leaves the loader, finished on the device that uses it.

Inputs cross from the loader to the training device as the source gives them (uint8 images: one byte
a pixel, not four) and are normalized there, as timm's `PrefetchLoader` and FFCV do. What comes after
the normalization in timm's order comes with them: random erasing (each erased box and its values,
drawn on the host from the view's seed: per pixel, or one per channel) and the mix (the
partner's raw view, the weight or the box). `RawViews.to(device)` moves the batch and gives the
finished float32 views there: the same operations in the same order as building them on the host, so
on the CPU they are the host-built views bit for bit, and on a GPU they are within its float rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

MIXUP, CUTMIX = 1, 2  # a partner's mix kind (pipeline.augment.mix's MIX values)


def normalize(raw: torch.Tensor, scale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(raw * scale - mean) / std as float32, in place on a float32 copy: the one normalization of views."""
    return raw.to(torch.float32, copy=True).mul_(scale).sub_(mean).div_(std)


def mix_pixels(own: torch.Tensor, other: torch.Tensor, kind: int, lam_bits: int, box) -> torch.Tensor:
    """The mixed view of a sample's normalized view `own` and its partner's `other`: CUTMIX pastes the
    partner's `box` (top, left, height, width); MIXUP blends with weight lam (its float32 bits) on `own`."""
    if kind == CUTMIX:
        top, left, height, width = (int(v) for v in box)
        mixed = own.clone()
        mixed[..., top:top + height, left:left + width] = other[..., top:top + height, left:left + width]
        return mixed
    lam = torch.tensor(np.int32(lam_bits).view(np.float32).item(), dtype=own.dtype, device=own.device)
    return own * lam + other * (1 - lam)


@dataclasses.dataclass
class Erased:
    """The boxes random erasing writes into some views, in the order it writes them: the row (of the
    views) and box (top, left, height, width) of each, whether its values are per pixel (C x height x
    width; otherwise one per channel, C, as timm's "rand" and "const" modes fill), and the values,
    flattened in order."""
    rows: torch.Tensor  # (E,) int64
    boxes: torch.Tensor  # (E, 4) int64
    per_pixel: torch.Tensor  # (E,) bool
    values: torch.Tensor  # float32

    @classmethod
    def none(cls) -> Erased:
        return cls.of([])

    @classmethod
    def of(cls, writes: list[tuple[int, tuple[int, int, int, int], torch.Tensor]]) -> Erased:
        """From (row, box, values (C, height, width) or (C, 1, 1)) triples."""
        return cls(torch.tensor([row for row, _, _ in writes], dtype=torch.int64),
                   torch.tensor([box for _, box, _ in writes], dtype=torch.int64).reshape(-1, 4),
                   torch.tensor([values.shape[-2:] != (1, 1) for _, _, values in writes], dtype=torch.bool),
                   torch.cat([values.reshape(-1).float() for _, _, values in writes]) if writes else torch.zeros(0))

    def apply(self, views: torch.Tensor) -> None:
        """Write the boxes into `views` (N, C, H, W), in place, as erasing assigns them."""
        start, channels = 0, views.shape[1]
        for row, (top, left, height, width), full in zip(self.rows.tolist(), self.boxes.tolist(),
                                                         self.per_pixel.tolist()):
            shape = (channels, height, width) if full else (channels, 1, 1)
            size = channels * (height * width if full else 1)
            views[row, :, top:top + height, left:left + width] = self.values[start:start + size].view(shape)
            start += size

    def _map(self, fn) -> Erased:
        return Erased(fn(self.rows), fn(self.boxes), fn(self.per_pixel), fn(self.values))


@dataclasses.dataclass
class RawViews:
    """A batch of views before normalization (see the module doc). `raw` (B, ...): each view's raw values
    (uint8 images after the geometric base and RandAugment; float event frames); `erased`: their erased
    boxes; `partners` (M, ...): the raw views of the mix partners, `partner_erased` theirs, and for each
    partner the row it mixes into, the mix kind, the weight's float32 bits and the box."""
    raw: torch.Tensor
    scale: float
    mean: torch.Tensor  # (C, 1, 1) float32
    std: torch.Tensor
    erased: Erased = dataclasses.field(default_factory=Erased.none)
    partners: torch.Tensor | None = None
    partner_erased: Erased = dataclasses.field(default_factory=Erased.none)
    mix_rows: torch.Tensor | None = None  # (M,) int64
    mix_kinds: torch.Tensor | None = None  # (M,) int64
    mix_lam_bits: torch.Tensor | None = None  # (M,) int64
    mix_boxes: torch.Tensor | None = None  # (M, 4) int64

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def shape(self) -> torch.Size:
        """The finished views' shape."""
        return self.raw.shape

    def nbytes(self) -> int:
        """Bytes that cross to the device: every tensor of the batch."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, Erased):
                yield from (value.rows, value.boxes, value.per_pixel, value.values)

    def _map(self, fn) -> RawViews:
        changed = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                changed[field.name] = fn(value)
            elif isinstance(value, Erased):
                changed[field.name] = value._map(fn)
        return dataclasses.replace(self, **changed)

    def pin_memory(self, device=None) -> RawViews:
        """Pinned host memory (a DataLoader with pin_memory calls this)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """The finished views (B, ...) float32 on `device`: the pixels and values moved there (as they are:
        uint8 images stay one byte a pixel), normalized, erased and mixed there. Rows, boxes and mix fields
        stay on the host, where the loops over them read them without waiting for the device."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        moved = dataclasses.replace(
            self, raw=move(self.raw), mean=move(self.mean), std=move(self.std),
            partners=None if self.partners is None else move(self.partners),
            erased=dataclasses.replace(self.erased, values=move(self.erased.values)),
            partner_erased=dataclasses.replace(self.partner_erased, values=move(self.partner_erased.values)))
        return moved.finish()

    def finish(self) -> torch.Tensor:
        """The finished views, where the batch is."""
        views = normalize(self.raw, self.scale, self.mean, self.std)
        self.erased.apply(views)
        if self.partners is not None and len(self.partners):
            others = normalize(self.partners, self.scale, self.mean, self.std)
            self.partner_erased.apply(others)
            for j, (row, kind, bits) in enumerate(zip(self.mix_rows.tolist(), self.mix_kinds.tolist(),
                                                      self.mix_lam_bits.tolist())):
                views[row] = mix_pixels(views[row], others[j], kind, bits, self.mix_boxes[j].tolist())
        return views


def device_batches(batches, device: torch.device):
    """`batches` on `device` (`to_device`, which finishes `RawViews` there). On CUDA the next batch is
    moved and finished in a side stream while the current one trains, as timm's PrefetchLoader does; the
    training stream waits for it before using it."""
    if device.type != "cuda":
        yield from (to_device(batch, device) for batch in batches)
        return
    side = torch.cuda.Stream(device)

    def ahead(batch):
        with torch.cuda.stream(side):
            return to_device(batch, device)

    ready = None
    for batch in batches:
        coming = ahead(batch)
        if ready is not None:
            yield ready
        torch.cuda.current_stream(device).wait_stream(side)
        _record_stream(coming, torch.cuda.current_stream(device))  # made on `side`, used on the training stream
        ready = coming
    if ready is not None:
        yield ready


def _record_stream(batch, stream) -> None:
    if isinstance(batch, dict):
        for value in batch.values():
            _record_stream(value, stream)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            _record_stream(value, stream)
    elif isinstance(batch, torch.Tensor):
        batch.record_stream(stream)


def to_device(batch, device: torch.device):
    """A batch (tensors, and dicts of them: teacher features by location; `RawViews`, finished there) on
    `device`."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(to_device(value, device) for value in batch)
    return batch.to(device, non_blocking=True)
