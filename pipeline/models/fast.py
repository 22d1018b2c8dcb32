"""Fast math where it is safe: autocast, channels_last, torch.compile and spikingjelly's neuron
implementations, for the teacher's forward at extraction and the student's forward in training.

Every setting is off, or resolves to off, on CPU by default, so a CPU run stays bit for bit what
it was: float32, contiguous layout, eager, spikingjelly's torch reference neurons.

  resolve_precision(device, value)        auto -> bfloat16 on a CUDA device that supports it, else float32
  autocast(device, precision)             torch.autocast for bfloat16 / float16, nothing for float32
  resolve_channels_last(device, value, m) auto -> on for a CUDA device when `m` has Conv2d layers
  prepare_teacher(model, device, ex)      -> FastTeacher; `.outputs(images, locations)` is
                                             `teacher_outputs` with channels_last inputs, autocast, compile
  prepare_student(student, device, st)    -> FastStudent; `.features(student, images, locations)` is the
                                             student's forward under autocast (compiled), cast to float32
                                             for the losses; `.grad_scaler()` for float16
  set_neuron_backend(model, backend, device, precision)

torch.compile compiles the whole forward-with-captures function (`teacher_outputs`,
`stages.spiking_outputs`), never a module: state dicts keep their key names, and the forward hooks
that capture feature locations are registered outside the compiled graphs (a graph break), so a
hook added after compilation is never silently skipped. `COMPILE_OPTIONS` are passed to
torch.compile (tests use a cheaper backend).

Benchmarks call these helpers directly.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from pipeline.config import CHANNELS_LAST, NEURON_BACKENDS, PRECISIONS, ExtractConfig, StudentConfig
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


@dataclass
class FastTeacher:
    """A teacher prepared for extraction: `outputs` replaces `teacher_outputs(model, ...)`."""

    model: nn.Module
    device: torch.device
    precision: str  # resolved: float32 | bfloat16 | float16
    channels_last: bool
    compile: bool
    forward: Callable | None = field(default=None, repr=False)  # default: models.teacher.teacher_outputs
    _outputs: Callable = field(default=None, repr=False)

    def __post_init__(self):
        if self.forward is None:
            from pipeline.models.teacher import teacher_outputs

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
    import dataclasses

    return dataclasses.replace(ex, precision=resolve_precision(device, ex.precision, "extract.precision"))


# spikingjelly 2.0 chooses the implementation of each multi-step neuron type on CUDA per process, through
# one selection object per type (spikingjelly._ops.<type>._selection, read from SJ_<TYPE>_CUDA_IMPLEMENTATION
# at import); there is no per-node `backend` attribute as in spikingjelly 0.0.0.0.x. The types bkd's
# students use, by node class name, and their op package:
NEURON_OPS = {"IFNode": "if_", "LIFNode": "lif", "ParametricLIFNode": "plif"}


def _node_ops(model: nn.Module) -> tuple[set[str], list[str]]:
    """(op packages of `model`'s spiking nodes, descriptions of nodes no forced implementation can run:
    another neuron type, or a surrogate spikingjelly's kernels do not have)."""
    from spikingjelly._ops.surrogate import _surrogate_spec

    from pipeline.neurons import spiking_layers

    packages, unsupported = set(), []
    for _, node in spiking_layers(model):
        package = next((NEURON_OPS[c.__name__] for c in type(node).__mro__ if c.__name__ in NEURON_OPS), None)
        if package is None:
            unsupported.append(f"{type(node).__name__} neurons")
        elif _surrogate_spec(getattr(node, "surrogate_function", None)) is None:
            unsupported.append(f"the {type(node.surrogate_function).__name__} surrogate")
        else:
            packages.add(package)
    return packages, unsupported


def _native_built(package: str) -> bool:
    try:
        return importlib.util.find_spec(f"spikingjelly._ops.{package}._C") is not None
    except (ImportError, ValueError):
        return False


def check_neuron_backend(backend: str, device: torch.device, precision: str,
                         field_name: str = "student.neuron_backend") -> str:
    """Refuse, before any heavy work, an implementation that cannot run here; return the resolved name:
    torch on CPU, auto (spikingjelly's own choice) on CUDA, or the forced cuda / triton / torch."""
    if backend not in NEURON_BACKENDS:
        raise ConfigError(f"{field_name} must be one of {', '.join(NEURON_BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "auto" if device.type == "cuda" else "torch"
    if backend == "cuda" and not any(_native_built(p) for p in set(NEURON_OPS.values())):
        raise ConfigError(f"{field_name}: cuda needs spikingjelly's native CUDA neurons, which are not built here "
                          "(install spikingjelly from source with SJ_BUILD_NATIVE_CUDA=1), or set triton or auto")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise ConfigError(f"{field_name}: triton is not installed (pip install triton), or set auto")
    if device.type != "cuda":
        if backend == "torch":
            return "torch"  # the only implementation on CPU
        raise ConfigError(f"{field_name}: {backend} runs on CUDA only, and this run is on {device}; "
                          "set auto or torch (or a CUDA device)")
    if precision != "float32":
        raise ConfigError(f"{field_name}: forcing {backend} needs float32 neurons, but the forward runs in "
                          f"{precision} autocast (spikingjelly's kernels keep a float32 membrane, and it refuses "
                          "its torch fallback when an implementation is forced); set student.precision: float32 "
                          f"or {field_name}: auto")
    return backend


def set_neuron_backend(model: nn.Module, backend: str, device: torch.device, precision: str = "float32",
                       field_name: str = "student.neuron_backend") -> str:
    """Use `backend` for the multi-step neurons of `model` on `device` (see `check_neuron_backend`) and
    return the resolved name. auto and CPU change nothing; a forced implementation is set for every node
    of the model's neuron types in this process (spikingjelly 2.0 selects per type, not per node)."""
    resolved = check_neuron_backend(backend, device, precision, field_name)
    if resolved == "auto" or torch.device(device).type != "cuda":
        return resolved
    packages, unsupported = _node_ops(model)
    if unsupported:
        raise ConfigError(f"{field_name}: {resolved} is not available for {unsupported[0]} (only "
                          f"{', '.join(NEURON_OPS)} with spikingjelly's built-in surrogates); set auto")
    if resolved == "cuda":
        missing = sorted(p for p in packages if not _native_built(p))
        if missing:
            raise ConfigError(f"{field_name}: spikingjelly's native CUDA kernels for {missing[0]} are not built "
                              "(rebuild spikingjelly with SJ_BUILD_NATIVE_CUDA=1), or set triton or auto")
    for package in sorted(packages):
        selection = importlib.import_module(f"spikingjelly._ops.{package}")._selection
        with selection._lock:
            selection._requested = resolved
            selection._selections.clear()
            selection._compiled_selections.clear()
    return resolved


@dataclass
class FastStudent:
    """The student's training-step math: autocast dtype, compilation, neuron implementation."""

    device: torch.device
    precision: str  # resolved: float32 | bfloat16 | float16
    compile: bool
    neuron_backend: str  # resolved: torch | auto | cuda | triton
    requested_backend: str = "auto"
    _outputs: Callable = field(default=None, repr=False)

    def __post_init__(self):
        from pipeline.models.stages import spiking_outputs

        self._outputs = compiled(spiking_outputs) if self.compile else spiking_outputs

    def autocast(self):
        return autocast(self.device, self.precision)

    def prepare(self, student: nn.Module) -> "FastStudent":
        """Set the neuron implementation for `student`'s nodes (refusing node types it does not cover)."""
        set_neuron_backend(student, self.requested_backend, self.device, self.precision)
        return self

    def features(self, student: nn.Module, images: torch.Tensor, locations: Sequence[str]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({location: feature}, logits) of one forward of `student` under autocast, cast to float32: the
        loss terms that follow are computed in float32."""
        with self.autocast():
            got, logits = self._outputs(student, images, list(locations))
        return {loc: got[loc].float() for loc in locations}, logits.float()

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        """A GradScaler for float16 (whose gradients underflow without one), None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "float16" else None

    def describe(self) -> str:
        backend = "spikingjelly's choice" if self.neuron_backend == "auto" else self.neuron_backend
        return (f"forward: {self.precision}{' with a GradScaler' if self.precision == 'float16' else ''}, "
                f"{'compiled' if self.compile else 'eager'}, neurons: {backend}")


def student_math(st: StudentConfig, device: torch.device) -> FastStudent:
    """Resolve student.precision / compile / neuron_backend for `device`, refusing what cannot run here
    (before any data or model is loaded); `.prepare(student)` then applies the neuron implementation."""
    device = torch.device(device)
    precision = resolve_precision(device, st.precision, "student.precision")
    backend = check_neuron_backend(st.neuron_backend, device, precision)
    return FastStudent(device, precision, bool(st.compile), backend, st.neuron_backend)


def prepare_student(student: nn.Module, device: torch.device, st: StudentConfig) -> FastStudent:
    """`student_math(st, device).prepare(student)`: everything the training step needs, in one call."""
    return student_math(st, device).prepare(student)
