"""The student's data path at ImageNet scale, on this machine: JPEG files vs the images decoded into
the store, one process vs loader workers.

A class folder of real photos (`benchmarks.photos`, ImageNet-like sizes) is extracted once (K views
of RandomResizedCrop + flip at 224 cut from the image at load_size 256, `extract.images` on; the
random ResNet-18 teacher looks at its inputs resized to 32 px, since only the data path is timed
here). Then the student's loader -- `CachedTargetDataset` with its chunk-aligned sampler, every
batch rebuilt from the stored view parameters -- runs two epochs four ways, side by side: pixels
from the JPEG files or from the store, in the training process or in `workers` persistent loader
processes (one lane of shuffle windows each). The second epoch is timed, as the hundreds of epochs
of a run see it (the first also pays worker start-up and each stored image's first-read digest
check; reported beside it). The batches are the same tensors either way (tests/test_loading.py);
only their cost differs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.config import Config, load_config
from pipeline.data import data_loader, load_split
from pipeline.student.splits import student_split
from pipeline.student.stream import open_student_targets, student_sampler
from pipeline.student.train import student_dataset
from pipeline.targets import bytes_on_disk
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.models import create_teacher

from benchmarks.common import CONFIG
from benchmarks.photos import make_jpeg_folder

CPU = torch.device("cpu")


def imagenet_config(tmp: Path, views: int = 2, *overrides: str) -> Config:
    """ImageNet at 224 from load_size 256 with stored images, a random ResNet-18 teacher, in `tmp`."""
    return load_config(CONFIG, [
        "data.name=imagenet", f"data.root={tmp / 'photos'}", "data.image_size=224", "data.load_size=256",
        "augment.kind=resized_crop_flip", "augment.flip=true", f"extract.views={views}", "extract.images=true",
        "extract.splits=[train]", "extract.features=[pre_logits]", "extract.chunk_size=32",
        "extract.chunks_per_shard=4", "extract.batch_size=32", "teacher.model=resnet18",
        "teacher.small_input_stem=false", "teacher.input_size=32", "teacher.device=cpu", "student.device=cpu",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}", f"extract.store={tmp / 'imagenet.zarr'}", *overrides])


def epoch_seconds(cfg: Config, stored: bool, workers: int, batch_size: int = 64,
                  buffer_chunks: int = 2) -> tuple[float, float]:
    """Seconds of (the first, the second) epoch of the student's batches (inputs, labels, targets)."""
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, shuffle_buffer_chunks=buffer_chunks,
                                                               augment="views", label_smoothing=0.0))
    split = load_split(cfg.data, "train")
    if stored:  # as training reads a store that holds the decoded pixels; else the JPEG files
        split, targets, _ = student_split(cfg, "train", split)
    else:
        targets = open_student_targets(cfg, "train", split)
    dataset = student_dataset(cfg, split, targets, ["pre_logits"])
    sampler = student_sampler(cfg, len(dataset), targets.chunk_size, batch_size, lanes=max(1, workers))
    loader = data_loader(dataset, batch_size, sampler, type(cfg.loader)(workers=workers, persistent_workers=True), CPU)
    seconds = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        started = time.perf_counter()
        seen = sum(len(labels) for _, labels, *_ in loader)
        seconds.append(time.perf_counter() - started)
        assert seen == len(dataset)
    return seconds[0], seconds[1]


def run(tmp: Path, classes: int = 4, per_class: int = 120, views: int = 2, workers: int = 2, reps: int = 1) -> dict:
    tmp = Path(tmp)
    folder = make_jpeg_folder(tmp / "photos", classes, per_class, seed=0, val_per_class=1)
    cfg = imagenet_config(tmp, views)
    split = load_split(cfg.data, "train")
    torch.manual_seed(0)
    checkpoint.save_weights(create_teacher(cfg.teacher, split.num_classes, split.image_shape).state_dict(),
                            cfg.teacher.checkpoint)
    started = time.perf_counter()
    extract_teacher(cfg, CPU, overwrite=True)
    extract_s = time.perf_counter() - started
    settings = {"jpeg_1": (False, 0), f"jpeg_{workers}": (False, workers),
                "stored_1": (True, 0), f"stored_{workers}": (True, workers)}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    first: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(reps):  # alternate, so machine noise hits every setting alike
        for name, (stored, w) in settings.items():
            a, b = epoch_seconds(cfg, stored, w)
            first[name].append(a)
            seconds[name].append(b)
    n = len(split)
    rate = {name: n / float(np.median(s)) for name, s in seconds.items()}
    return {
        "samples": n, "views": views, "workers": workers, "folder": folder, "extract_s": extract_s,
        "store_bytes_per_image": bytes_on_disk(cfg.extract.store) / n,
        "epoch_s": seconds, "first_epoch_s": first, "samples_per_s": rate,
        "workers/one_process": rate[f"jpeg_{workers}"] / rate["jpeg_1"],
        "stored/jpeg": rate["stored_1"] / rate["jpeg_1"],
        "stored_workers/jpeg_workers": rate[f"stored_{workers}"] / rate[f"jpeg_{workers}"],
    }


if __name__ == "__main__":
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m benchmarks.loading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bkd-loading-") as tmp:
        print(json.dumps(run(Path(tmp), per_class=args.per_class, workers=args.workers, reps=args.reps), indent=2))
