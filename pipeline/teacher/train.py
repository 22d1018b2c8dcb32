"""The teacher recipe: train the ANN teacher (a timm model, or a bkd:<student> SNN) with cross-entropy
on the engine, or adopt a user's own weights; either way the weights land at teacher.checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data import data_loader, load_split, load_splits, random_shift, scattered_read_warning, scored_split
from pipeline.distributed import resolve_device
from pipeline.engine import Trainer, optimizer_for
from pipeline.errors import BkdError
from pipeline.locks import PathLock
from pipeline.metrics import accuracy
from pipeline.rundir import RunFolder
from pipeline.samplers import ChunkShuffleSampler
from pipeline.teacher.models import create_teacher, load_teacher, teacher_metadata


def check_teacher_weights(path: str | Path, overwrite: bool, own: str | None = None,
                          data: bytes | None = None) -> str | None:
    """Refuse to replace the weights at teacher.checkpoint unless asked (`overwrite`), they are the ones
    being written (`data`, their bytes), or the run writing them made them (`own`: their sha256, as the
    run folder's run.json records it, or as accepted before training). A store extracted from a teacher
    names its weights' hash: replaced unasked, the weights it was built from would be lost and the store
    refused. Returns the sha256 of the weights found there (None: none)."""
    checkpoint.check_replaceable_weights(path)  # a file bkd did not write: never, --overwrite or not
    path = Path(path)
    if not path.is_file():
        return None
    found = path.read_bytes()
    sha = hashlib.sha256(found).hexdigest()
    if overwrite or sha == own or (data is not None and checkpoint.same_weights(found, data)):
        return sha
    meta = checkpoint.read_metadata(path)
    origin = f"adopted from {meta['source']}" if "source" in meta else f"a {meta.get('model', 'teacher')} teacher"
    raise BkdError(f"{path} holds other teacher weights ({origin}); a store extracted from them would no longer "
                   "match; pass --overwrite to replace them, or set another teacher.checkpoint")


def weights_lock(path: str | Path) -> PathLock:
    """Held while a run checks and writes teacher.checkpoint: `CHECKPOINT.lock` beside it."""
    return PathLock(f"{path}.lock", f"{path} is being written by another bkd run")


def write_teacher_weights(path: str | Path, data: bytes, overwrite: bool, own: str | None = None,
                          record=None) -> None:
    """Write `data` at `path` if `check_teacher_weights` allows it; equal weights already there are kept
    as they are (the same tensors and metadata need not be the same bytes, and a store extracted from the
    file names its hash). `record(sha256)`: told the hash of the file that ends up there, before it is written."""
    found = check_teacher_weights(path, overwrite, own=own, data=data)  # the sha256 of what is there
    if found is not None and checkpoint.same_weights(Path(path).read_bytes(), data):
        if record:
            record(found)
        return
    if record:
        record(hashlib.sha256(data).hexdigest())  # before the file: a crash between is resumable
    checkpoint.write_weights_bytes(data, path)


def adopt_teacher(cfg: Config, own_weights: str, overwrite: bool = False) -> dict:
    """Use a user's local weights for cfg.teacher.model instead of training: check, evaluate, save."""
    checkpoint.check_replaceable_weights(cfg.teacher.checkpoint)
    test = load_split(cfg.data, "test")
    device = resolve_device(cfg.teacher.device)
    model = load_teacher(cfg.teacher, test.num_classes, test.image_shape, own_weights).to(device)
    data = checkpoint.weights_bytes(model.state_dict(), teacher_metadata(cfg.teacher, test, source=str(own_weights)))
    with weights_lock(cfg.teacher.checkpoint):
        write_teacher_weights(cfg.teacher.checkpoint, data, overwrite)
    return {"split": scored_split(cfg.data), "test_accuracy": accuracy(model, test, device), "model": cfg.teacher.model,
            "source": str(own_weights)}


def train_teacher(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the teacher (timm, or a bkd:<student> SNN) with cross-entropy; save safetensors weights at
    cfg.teacher.checkpoint (an SNN teacher with student-style metadata, so `load_teacher` can check it)."""
    folder = RunFolder(run_dir, cfg, "teacher", resume, overwrite)
    folder.check()
    accepted = check_teacher_weights(cfg.teacher.checkpoint, overwrite, own=folder.weights_sha256())
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
                      evaluate=lambda: accuracy(model, test, device, cfg.loader), device=device, desc="teacher",
                      evaluated_on=scored_split(cfg.data))
    with folder:
        history = trainer.fit(resume)
        data = checkpoint.weights_bytes(model.state_dict(), teacher_metadata(tcfg, train, len(history)))
        with weights_lock(tcfg.checkpoint):  # another run's check and write never fall between ours
            write_teacher_weights(tcfg.checkpoint, data, False, own=accepted, record=folder.record_weights)
        folder.finish()
    return {"split": scored_split(cfg.data), "test_accuracy": history[-1]["test_accuracy"],
            "train_accuracy": history[-1]["train_accuracy"], "epochs": len(history), "model": tcfg.model}
