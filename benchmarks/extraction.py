"""Extraction throughput: `extract_teacher` end to end vs a bare teacher forward loop.

Both start from the same config (by default the default one, its train split, with a random teacher
written by `random_teacher_config`; the paper-scale section passes ImageNet- and CIFAR-sized ones),
load the teacher from its checkpoint onto the same device, and push the same inputs through it at
extract.batch_size and the same precision. The bare loop only reads the inputs and computes (on
CUDA, the clock stops after torch.cuda.synchronize); `extract_teacher` also applies the views,
copies the outputs back, converts to float16, digests the inputs, compresses and writes the store.
They alternate, `reps` times each, and the ratio of median throughputs says whether writing the
store slows extraction down.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import load_split
from pipeline.extract import extract_teacher
from pipeline.models import load_teacher
from pipeline.models import teacher_outputs
from pipeline.targets import store_info

from benchmarks.common import autocast, effective_precision, synchronize

CPU = torch.device("cpu")


def bare_loop(cfg: Config, device: torch.device = CPU, precision: str = "float32") -> float:
    """Seconds to load the teacher and run it over every train input, extract.views times, at
    `precision` (resolved: float32, bfloat16 or float16 by autocast), writing nothing."""
    synchronize(device)
    started = time.perf_counter()
    split = load_split(cfg.data, "train")
    teacher = load_teacher(cfg.teacher, split.num_classes, split.image_shape).to(device)
    batch = cfg.extract.batch_size
    with torch.no_grad(), autocast(precision, device):
        for start in range(0, len(split), batch):
            images = split.load(range(start, min(start + batch, len(split)))).to(device)
            for _ in range(cfg.extract.views):  # one forward per view, as extraction runs (views not built)
                teacher_outputs(teacher, images, cfg.extract.features)
    synchronize(device)
    return time.perf_counter() - started


def run(cfg: Config, reps: int = 2, device: torch.device = CPU, precision: str | None = None) -> dict:
    """`precision`: the bare loop's; default, the one `extract_teacher` runs at under `cfg`
    (extract.precision where the config has that field, float32 before it)."""
    precision = precision or effective_precision(cfg, "extract", device)
    samples = len(load_split(cfg.data, "train")) * cfg.extract.views
    bare_s, extract_s = [], []
    for _ in range(reps):
        bare_s.append(bare_loop(cfg, device, precision))
        synchronize(device)
        started = time.perf_counter()
        extract_teacher(cfg, device, overwrite=True)
        synchronize(device)
        extract_s.append(time.perf_counter() - started)
    bare, extract = float(np.median(bare_s)), float(np.median(extract_s))
    return {
        "samples": samples,
        "device": str(device),
        "precision": precision,
        "batch_size": cfg.extract.batch_size,
        "teacher_model": cfg.teacher.model,
        "bare_loop_s": bare_s,
        "extract_s": extract_s,
        "bare_samples_per_s": samples / bare,
        "extract_samples_per_s": samples / extract,
        "ratio": bare / extract,  # extraction throughput / bare throughput
        "store": store_info(Path(cfg.extract.store)),
    }
