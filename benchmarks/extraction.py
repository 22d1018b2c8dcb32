"""Extraction throughput: `extract_teacher` end to end vs a bare teacher forward loop.

Both start from the same config (the default one, its train split, with a random teacher written by
`random_teacher_config`), load the teacher from its checkpoint, and push the same inputs through
it at extract.batch_size. The bare loop only computes; `extract_teacher` also applies the views,
converts to float16, compresses and writes the store. They alternate, `reps` times each, and the
ratio of median throughputs says whether writing the store slows extraction down.
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


def bare_loop(cfg: Config) -> float:
    """Seconds to load the teacher and run it over every train input, writing nothing."""
    started = time.perf_counter()
    split = load_split(cfg.data, "train")
    teacher = load_teacher(cfg.teacher, split.num_classes, split.image_shape)
    batch = cfg.extract.batch_size
    with torch.no_grad():
        for start in range(0, len(split), batch):
            teacher_outputs(teacher, split.load(range(start, min(start + batch, len(split)))), cfg.extract.features)
    return time.perf_counter() - started


def run(cfg: Config, reps: int = 2) -> dict:
    samples = len(load_split(cfg.data, "train")) * cfg.extract.views
    bare_s, extract_s = [], []
    for _ in range(reps):
        bare_s.append(bare_loop(cfg))
        started = time.perf_counter()
        extract_teacher(cfg, torch.device("cpu"), overwrite=True)
        extract_s.append(time.perf_counter() - started)
    bare, extract = float(np.median(bare_s)), float(np.median(extract_s))
    return {
        "samples": samples,
        "bare_loop_s": bare_s,
        "extract_s": extract_s,
        "bare_samples_per_s": samples / bare,
        "extract_samples_per_s": samples / extract,
        "ratio": bare / extract,  # extraction throughput / bare throughput
        "store": store_info(Path(cfg.extract.store)),
    }
