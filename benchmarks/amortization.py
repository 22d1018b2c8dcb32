"""Amortization: an ablation sweep of S students with the teacher online vs from one cached extraction.

Teacher forward passes: online, every student runs the teacher on every sample of every epoch
(S * E * N); cached, the teacher runs once per sample and view (K * N), whatever S and E.
The measured sweep trains S `mixed` students (blur ratios 0.05 ... 0.5) for E epochs on the first
N training digits both ways, with the timed steps of `step_time`: cached = one extraction plus S
students reading the store; online = S students, each loading the teacher and running it every step.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data import load_split
from pipeline.teacher.extract import extract_teacher

from benchmarks.common import random_teacher_config
from benchmarks.step_time import make_setting

BLUR_RATIOS = (0.05, 0.15, 0.3, 0.5)


def _with_blur(cfg: Config, ratio: float) -> Config:
    bkd = dataclasses.replace(cfg.student.bkd, blur_ratio=ratio)
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, bkd=bkd))


def _train(setting, epochs: int) -> None:
    for _ in range(epochs * len(setting.loader)):
        setting.step(record=False)


def run(tmp: Path, students: int = 4, epochs: int = 1, samples: int = 1024) -> dict:
    cfg = random_teacher_config(tmp, f"data.limit={samples}")
    train = load_split(cfg.data, "train")
    ratios = BLUR_RATIOS[:students]

    started = time.perf_counter()
    extract_teacher(cfg, torch.device("cpu"))
    extraction_s = time.perf_counter() - started
    cached_students_s = []
    for ratio in ratios:
        started = time.perf_counter()
        _train(make_setting("cached", _with_blur(cfg, ratio)), epochs)
        cached_students_s.append(time.perf_counter() - started)

    online_students_s = []
    for ratio in ratios:
        started = time.perf_counter()
        _train(make_setting("online", _with_blur(cfg, ratio)), epochs)  # loads the teacher, runs it every step
        online_students_s.append(time.perf_counter() - started)

    n, views = len(train), cfg.extract.views
    cached_s = extraction_s + sum(cached_students_s)
    online_s = sum(online_students_s)
    return {
        "students": students, "epochs": epochs, "samples": n, "views": views, "blur_ratios": list(ratios),
        "teacher_passes_online": students * epochs * n,
        "teacher_passes_cached": views * n,
        "extraction_s": extraction_s,
        "cached_students_s": cached_students_s,
        "online_students_s": online_students_s,
        "cached_sweep_s": cached_s,
        "online_sweep_s": online_s,
        "online/cached": online_s / cached_s,
    }


def default_sweep_passes(cfg: Config, students: int = 4) -> dict:
    """Teacher passes of a sweep of `students` on the full default config (no measuring)."""
    n = len(load_split(cfg.data, "train"))
    epochs = cfg.student.train_epochs()  # with the schedule's cooldown epochs
    return {"students": students, "epochs": epochs, "samples": n, "views": cfg.extract.views,
            "teacher_passes_online": students * epochs * n, "teacher_passes_cached": cfg.extract.views * n}
