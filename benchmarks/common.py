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
from pipeline.models import create_teacher

CONFIG = "configs/mnist5k.yaml"


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
    train = load_split(cfg.data, "train")
    torch.manual_seed(cfg.seed)
    teacher = create_teacher(cfg.teacher, train.num_classes, train.image_shape)
    checkpoint.save_weights(teacher.state_dict(), cfg.teacher.checkpoint,
                            metadata={"model": cfg.teacher.model, "source": "random init (benchmark)"})
    return cfg


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
