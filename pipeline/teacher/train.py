"""The teacher recipe: train the ANN teacher (a timm model, or a bkd:<student> SNN) with cross-entropy
on the engine, or adopt a user's own weights; either way the weights land at teacher.checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data import data_loader, load_split, load_splits, random_shift, scattered_read_warning
from pipeline.distributed import resolve_device
from pipeline.engine import Trainer, optimizer_for
from pipeline.metrics import accuracy
from pipeline.rundir import RunFolder
from pipeline.samplers import ChunkShuffleSampler
from pipeline.teacher.models import create_teacher, load_teacher, teacher_metadata


def adopt_teacher(cfg: Config, own_weights: str) -> dict:
    """Use a user's local weights for cfg.teacher.model instead of training: check, evaluate, save."""
    checkpoint.check_replaceable_weights(cfg.teacher.checkpoint)
    test = load_split(cfg.data, "test")
    device = resolve_device(cfg.teacher.device)
    model = load_teacher(cfg.teacher, test.num_classes, test.image_shape, own_weights).to(device)
    checkpoint.save_weights(model.state_dict(), cfg.teacher.checkpoint,
                            metadata=teacher_metadata(cfg.teacher, test, source=str(own_weights)))
    return {"test_accuracy": accuracy(model, test, device), "model": cfg.teacher.model, "source": str(own_weights)}


def train_teacher(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the teacher (timm, or a bkd:<student> SNN) with cross-entropy; save safetensors weights at
    cfg.teacher.checkpoint (an SNN teacher with student-style metadata, so `load_teacher` can check it)."""
    folder = RunFolder(run_dir, cfg, "teacher", resume, overwrite)
    folder.check()
    checkpoint.check_replaceable_weights(cfg.teacher.checkpoint)
    tcfg = cfg.teacher
    device = resolve_device(tcfg.device)
    train, test = load_splits(cfg.data, ("train", "test")).values()
    if warning := scattered_read_warning(train):
        tqdm.write(warning)
    torch.manual_seed(tcfg.seed)
    model = create_teacher(tcfg, train.num_classes, train.image_shape).to(device)
    sampler = ChunkShuffleSampler(len(train), chunk_size=len(train), buffer_chunks=1, seed=tcfg.seed)
    loader = data_loader(train, tcfg.batch_size, sampler, cfg.loader, device)
    optimizer, scheduler = optimizer_for(tcfg, model, len(loader))

    def step(batch):
        images, labels, _ = batch
        logits = model(random_shift(images, tcfg.random_shift))
        loss = nn.functional.cross_entropy(logits, labels)
        return {"loss": loss}, logits, labels

    trainer = Trainer(modules={"model": model}, step=step, loader=loader, sampler=sampler, optimizer=optimizer,
                      scheduler=scheduler, epochs=tcfg.epochs, run_dir=run_dir,
                      evaluate=lambda: accuracy(model, test, device, cfg.loader), device=device, desc="teacher")
    with folder:
        history = trainer.fit(resume)
        checkpoint.save_weights(model.state_dict(), tcfg.checkpoint,
                                metadata=teacher_metadata(tcfg, train, len(history)))
        folder.finish()
    return {"test_accuracy": history[-1]["test_accuracy"], "train_accuracy": history[-1]["train_accuracy"],
            "epochs": len(history), "model": tcfg.model}
