"""The student's training-step math, fast where it is safe: autocast (and a GradScaler for float16),
torch.compile of the forward-with-captures, and spikingjelly's neuron implementations on CUDA.
Every setting resolves to off on CPU by default, so a CPU run stays bit for bit what it was."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from pipeline.config import NEURON_BACKENDS, StudentConfig
from pipeline.errors import ConfigError
from pipeline.locations import spiking_outputs
from pipeline.precision import autocast, compiled, resolve_precision


# spikingjelly 2.0 chooses the implementation of each multi-step neuron type on CUDA per process, through
# one selection object per type (spikingjelly._ops.<type>._selection, read from SJ_<TYPE>_CUDA_IMPLEMENTATION
# at import); there is no per-node `backend` attribute as in spikingjelly 0.0.0.0.x. The types bkd's
# students use, by node class name, and their op package:
NEURON_OPS = {"IFNode": "if_", "LIFNode": "lif", "ParametricLIFNode": "plif"}


def _node_ops(model: nn.Module) -> tuple[set[str], list[str]]:
    """(op packages of `model`'s spiking nodes, descriptions of nodes no forced implementation can run:
    another neuron type, or a surrogate spikingjelly's kernels do not have)."""
    from spikingjelly._ops.surrogate import _surrogate_spec

    from pipeline.student.neurons import spiking_layers

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
