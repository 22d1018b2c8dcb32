"""Fast math where it is safe, shared by both stages: autocast, channels_last and torch.compile.
The teacher's use of them is `pipeline.teacher.fast`, the student's (with spikingjelly's neuron
implementations) `pipeline.student.fast`.

Every setting is off, or resolves to off, on CPU by default, so a CPU run stays bit for bit what
it was: float32, contiguous layout, eager, spikingjelly's torch reference neurons.

  resolve_precision(device, value)        auto -> bfloat16 on a CUDA device that supports it, else float32
  autocast(device, precision)             torch.autocast for bfloat16 / float16, nothing for float32
  resolve_channels_last(device, value, m) auto -> on for a CUDA device when `m` has Conv2d layers
  compiled(fn)                            torch.compile(fn) with COMPILE_OPTIONS

torch.compile compiles the whole forward-with-captures function (`teacher_outputs`,
`locations.spiking_outputs`), never a module: state dicts keep their key names, and the forward hooks
that capture feature locations are registered outside the compiled graphs (a graph break), so a
hook added after compilation is never silently skipped. `COMPILE_OPTIONS` are passed to
torch.compile (tests use a cheaper backend).

Benchmarks call these helpers directly.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from pipeline.config import CHANNELS_LAST, PRECISIONS
from pipeline.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_OPTIONS: dict = {}  # keyword arguments of every torch.compile call made here


def resolve_precision(device: torch.device, value: str, field_name: str = "precision") -> str:
    """The autocast dtype name `value` means on `device`: auto is bfloat16 on a CUDA device that supports
    it and float32 everywhere else; float32 / bfloat16 / float16 are taken as they are (bfloat16 on a GPU
    without it is refused, naming `field_name`)."""
    if value not in PRECISIONS:
        raise ConfigError(f"{field_name} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if value == "auto":
        return "bfloat16" if cuda and _bf16_supported(device) else "float32"
    if value == "bfloat16" and cuda and not _bf16_supported(device):
        raise ConfigError(f"{field_name}: bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
                          "use float16 or float32")
    return value


def _bf16_supported(device: torch.device) -> bool:
    """Native bfloat16 on `device` (NVIDIA sm_80 and later). torch.cuda.is_bf16_supported() also says yes
    where bfloat16 is only emulated (slowly), and asks the current device rather than `device`."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device) >= (8, 0)


def autocast(device: torch.device, precision: str):
    """A context in which `device`'s forward runs in `precision` (a resolved name): torch.autocast for
    bfloat16 and float16, a no-op for float32 (so float32 runs exactly the code they ran before)."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"precision must be float32, bfloat16 or float16 (resolved), got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def resolve_channels_last(device: torch.device, value: str | bool, model: nn.Module,
                          field_name: str = "extract.channels_last") -> bool:
    """on / off (or True / False) as given; auto is on for a CUDA device when `model` has Conv2d layers,
    off on CPU."""
    if isinstance(value, bool):
        return value
    if value not in CHANNELS_LAST:
        raise ConfigError(f"{field_name} must be one of {', '.join(CHANNELS_LAST)}, got {value!r}")
    if value == "auto":
        return torch.device(device).type == "cuda" and has_conv2d(model)
    return value == "on"


def channels_last_inputs(images: torch.Tensor) -> torch.Tensor:
    """4-D images in channels_last layout (other tensors, e.g. event frames, as they are)."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with COMPILE_OPTIONS (compilation itself happens on the first call)."""
    return torch.compile(fn, **COMPILE_OPTIONS)
