"""Extraction throughput: `extract_teacher` end to end vs a bare teacher forward loop.

Both start from the same config (by default the default one, its train split, with a random teacher
written by `random_teacher_config`; the paper-scale section passes ImageNet- and CIFAR-sized ones),
load the teacher from its checkpoint onto the same device, prepare it the same way
(`pipeline.teacher.fast.prepare_teacher`: extract.precision, channels_last, compile), read the inputs
through the same kind of loader (`pipeline.data.data_loader`, loader.workers) and push them through
it at extract.batch_size. The bare loop only reads and computes (on CUDA, the clock stops after
torch.cuda.synchronize); `extract_teacher` also builds the views, copies the outputs back, converts
to float16, digests the inputs, compresses and writes the store. They alternate, `reps` times each,
and the ratio of median throughputs says whether writing the store slows extraction down.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import data_loader, load_split
from pipeline.targets import store_info
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.fast import prepare_teacher
from pipeline.teacher.models import load_teacher

from benchmarks.common import synchronize

CPU = torch.device("cpu")


def bare_loop(cfg: Config, device: torch.device = CPU) -> tuple[float, dict]:
    """(seconds, the teacher's math: precision, channels_last, compile) to load the teacher and run it
    over every train input, extract.views times, prepared as extraction prepares it, writing nothing."""
    synchronize(device)
    started = time.perf_counter()
    split = load_split(cfg.data, "train")
    teacher = prepare_teacher(load_teacher(cfg.teacher, split.num_classes, split.image_shape).to(device), device,
                              cfg.extract)
    with torch.no_grad():
        for images, *_ in data_loader(split, cfg.extract.batch_size, None, cfg.loader, device):
            images = images.to(device, non_blocking=True)
            for _ in range(cfg.extract.views):  # one forward per view, as extraction runs (views not built)
                teacher.outputs(images, cfg.extract.features)
    synchronize(device)
    return time.perf_counter() - started, {"precision": teacher.precision, "channels_last": teacher.channels_last,
                                           "compile": teacher.compile}


def run(cfg: Config, reps: int = 2, device: torch.device = CPU) -> dict:
    samples = len(load_split(cfg.data, "train")) * cfg.extract.views
    bare_s, extract_s = [], []
    for _ in range(reps):
        seconds, math = bare_loop(cfg, device)
        bare_s.append(seconds)
        synchronize(device)
        started = time.perf_counter()
        extract_teacher(cfg, device, overwrite=True)
        synchronize(device)
        extract_s.append(time.perf_counter() - started)
    bare, extract = float(np.median(bare_s)), float(np.median(extract_s))
    return {
        "samples": samples,
        "device": str(device),
        "precision": math["precision"],
        "teacher_math": math,
        "loader_workers": cfg.loader.workers,
        "batch_size": cfg.extract.batch_size,
        "teacher_model": cfg.teacher.model,
        "bare_loop_s": bare_s,
        "extract_s": extract_s,
        "bare_samples_per_s": samples / bare,
        "extract_samples_per_s": samples / extract,
        "ratio": bare / extract,  # extraction throughput / bare throughput
        "store": store_info(Path(cfg.extract.store)),
    }
