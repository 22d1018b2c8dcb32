"""What every spiking student is: the registry (`register_student`, `create_student`), the input
encoding over T timesteps, and `SpikingStudent`, timm's interface over a time-averaged feature map.
The students themselves register in `pipeline.student.models` (importing it fills the registry)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError, clip

STUDENTS: dict[str, Callable[..., nn.Module]] = {}


def register_student(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    STUDENTS[fn.__name__] = fn
    return fn


def create_student(name: str, num_classes: int, input_shape: tuple[int, ...], timesteps: int,
                   **kwargs) -> nn.Module:
    """A registered student for inputs of `input_shape` ((C, H, W) images or (T, C, H, W) frames)."""
    if name not in STUDENTS:
        raise ConfigError(f"student.model: unknown student '{name}' (known: {', '.join(sorted(STUDENTS))})")
    # Only construction is wrapped: whatever fails while building the model comes from
    # student.model_kwargs (unknown names, wrong types, sizes torch refuses) and is bad input.
    try:
        model = STUDENTS[name](num_classes=num_classes, input_shape=tuple(input_shape), timesteps=timesteps,
                               **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- reported as bad input, see above
        raise ConfigError(f"student.model_kwargs: {_first_line(exc)}") from None
    # torch builds zero-width layers without complaint (and fails only in the first forward)
    if any(p.numel() == 0 for p in model.parameters()):
        raise ConfigError(f"student.model_kwargs: {clip(repr(kwargs), 200)} builds a layer with no weights "
                          "(a width or size of 0?)")
    return model


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return clip(lines[0].strip() if lines else type(exc).__name__, 200)


def encode(x: torch.Tensor, timesteps: int) -> torch.Tensor:
    """The student's input as [T, B, C, H, W].

    Images [B, C, H, W] use direct encoding (the same image at every timestep); event frames
    [B, T, C, H, W] feed one frame per timestep, so T must match the frames.
    """
    if x.dim() == 4:
        return x.unsqueeze(0).expand(timesteps, *x.shape)
    if x.dim() == 5:
        if x.shape[1] != timesteps:
            raise ConfigError(f"the input has {x.shape[1]} event frames but student.timesteps is {timesteps}")
        return x.transpose(0, 1)
    raise ValueError(f"expected [B, C, H, W] images or [B, T, C, H, W] frames, got shape {tuple(x.shape)}")


class SpikingStudent(nn.Module):
    """timm's interface over `forward_feature_map` (the time-averaged last feature map):
    forward_features pools it over space (averaging over time and space commute, so this is the
    pooled, time-averaged feature BKD distills), forward_head is the linear classifier `fc`.

    `stage_names`: the module names (for `pipeline.locations.capture`) of the student's stage
    outputs, shallow to deep; each module outputs [T, B, C, H, W] and the last one is the map
    forward_feature_map averages over T."""

    stage_names: tuple[str, ...] = ()

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_feature_map(x).mean((2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
