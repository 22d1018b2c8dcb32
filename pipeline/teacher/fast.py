"""The teacher's forward at extraction, fast where it is safe (see `pipeline.precision`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from pipeline.config import ExtractConfig
from pipeline.precision import autocast, channels_last_inputs, compiled, resolve_channels_last, resolve_precision


@dataclass
class FastTeacher:
    """A teacher prepared for extraction: `outputs` replaces `teacher_outputs(model, ...)`."""

    model: nn.Module
    device: torch.device
    precision: str  # resolved: float32 | bfloat16 | float16
    channels_last: bool
    compile: bool
    forward: Callable | None = field(default=None, repr=False)  # default: teacher.models.teacher_outputs
    _outputs: Callable = field(default=None, repr=False)

    def __post_init__(self):
        if self.forward is None:
            from pipeline.teacher.models import teacher_outputs

            self.forward = teacher_outputs
        self._outputs = compiled(self.forward) if self.compile else self.forward

    def outputs(self, images: torch.Tensor, locations: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({location: feature}, logits) of one forward of the teacher, in the autocast dtype (callers cast
        to float32 before storing)."""
        if self.channels_last:
            images = channels_last_inputs(images)
        with autocast(self.device, self.precision):
            return self._outputs(self.model, images, list(locations))

    def describe(self) -> str:
        return (f"forward: {self.precision}, channels_last {'on' if self.channels_last else 'off'}, "
                f"{'compiled' if self.compile else 'eager'}")


def prepare_teacher(model: nn.Module, device: torch.device, ex: ExtractConfig,
                    forward: Callable | None = None) -> FastTeacher:
    """Resolve extract.precision / channels_last / compile for `device` and prepare `model` (on `device`)
    for them: channels_last converts the weights in place. The model itself is not wrapped, so its
    attributes (num_features, modules for feature locations) stay as they are. `forward` is the
    forward-with-captures to run, `teacher_outputs(model, images, locations)` by default (extraction
    passes its module's own reference, which tests replace to record what the teacher is fed)."""
    device = torch.device(device)
    precision = resolve_precision(device, ex.precision, "extract.precision")
    channels_last = resolve_channels_last(device, ex.channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return FastTeacher(model, device, precision, channels_last, bool(ex.compile), forward)


def resolve_extract(ex: ExtractConfig, device: torch.device) -> ExtractConfig:
    """`ex` with precision resolved for `device`: the planning process of an extraction resolves it once,
    so the store's manifest and every dask worker use the same value, whatever device each worker has."""
    return dataclasses.replace(ex, precision=resolve_precision(device, ex.precision, "extract.precision"))
