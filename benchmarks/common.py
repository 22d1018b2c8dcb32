"""What the benchmarks share: a config with a randomly initialised teacher, timing summaries, the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.config import Config, load_config
from pipeline.data import load_split
from pipeline.teacher.models import create_teacher

CONFIG = "params.yaml"


def random_teacher_config(tmp: Path, *overrides: str) -> Config:
    """The default config with its teacher checkpoint and store in `tmp`; the teacher is a seeded
    random init (accuracy does not matter for speed), written there as safetensors."""
    cfg = load_config(CONFIG, [
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}",
        f"extract.store={tmp / 'targets.zarr'}",
        "extract.splits=[train]",
        "teacher.device=cpu",
        "student.device=cpu",
        "extract.features=[pre_logits]",  # what the mixed student reads; benchmarks time that path
        *overrides,
    ])
    write_random_teacher(cfg)
    return cfg


def write_random_teacher(cfg: Config) -> None:
    """Write a seeded random init of cfg.teacher.model for cfg's dataset at cfg.teacher.checkpoint
    (timm's `pretrained=False`: no weights are downloaded; accuracy does not matter for speed)."""
    train = load_split(cfg.data, "train")
    torch.manual_seed(cfg.seed)
    teacher = create_teacher(cfg.teacher, train.num_classes, train.image_shape)
    Path(cfg.teacher.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_weights(teacher.state_dict(), cfg.teacher.checkpoint,
                            metadata={"model": cfg.teacher.model, "source": "random init (benchmark)"})


def summarize(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak resident set size since start or the last `reset_peak_rss` (Linux)."""
    return _proc_status_mb("VmHWM")


def reset_peak_rss() -> float:
    """Restart the peak-RSS count from the current RSS (Linux: write 5 to clear_refs); return that RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _proc_status_mb("VmRSS")


def machine() -> dict:
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


# --- devices, precision and config hooks --------------------------------------------------------------------


def benchmark_device(name: str) -> torch.device:
    """torch.device(name) for `cpu` or `cuda[:k]`; CUDA that is not there is a one-line error (ValueError)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu or cuda[:k])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'built without CUDA' if torch.version.cuda is None else 'no CUDA device visible'})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are benchmarked")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def has_field(cfg: Config, dotted: str) -> bool:
    """Whether the config schema has `section.field` (e.g. extract.precision, loader.workers)."""
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def load_with_hooks(path: str | Path, overrides: list[str], hooks: dict[str, object]) -> tuple[Config, dict]:
    """`load_config(path, overrides)` plus each `hooks` entry ({dotted field: value}, e.g.
    {"extract.precision": "bfloat16", "loader.workers": 2}) as an override where the config schema
    has that field (a benchmark can name options a branch of the pipeline does not have yet).
    Returns the config and {field: value applied, or None where the schema lacks it}."""
    cfg = load_config(path, overrides)
    applied = {key: (value if has_field(cfg, key) else None) for key, value in hooks.items()}
    extra = [f"{key}={value}" for key, value in applied.items() if value is not None]
    return (load_config(path, [*overrides, *extra]) if extra else cfg), applied


def effective_precision(cfg: Config, section: str, device: torch.device) -> str:
    """The autocast precision `section` (extract | student) of the pipeline runs at under `cfg` on
    `device` (pipeline.precision.resolve_precision: auto is bfloat16 on a CUDA device with native
    bfloat16, float32 elsewhere)."""
    from pipeline.precision import resolve_precision

    return resolve_precision(device, getattr(cfg, section).precision, f"{section}.precision")
