"""The one training loop, and the two runs built on it: the ANN teacher and the SNN student.

`Trainer` owns epochs, optimisation, per-epoch evaluation, history and checkpoints; a run
supplies only its modules, its data and a `step` that turns a batch into loss terms.
Checkpoints (written atomically every epoch) hold every module, the optimizer, the
scheduler, the RNG state and the history, so `resume=True` continues bit for bit.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.augment import view_augmenter
from pipeline.config import AugmentConfig, Config, dump_config
from pipeline.data import collate_batch, load_split, random_shift
from pipeline.errors import BkdError
from pipeline.evaluate import accuracy
from pipeline.losses import DistillationLoss
from pipeline.models import create_student, create_teacher
from pipeline.extract import open_student_targets
from pipeline.stream import CachedTargetDataset, ChunkShuffleSampler

StepFn = Callable[[tuple], tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BkdError(f"device '{name}' requested but CUDA is not available on this machine")
    return torch.device(name)


def write_json(data, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class Trainer:
    def __init__(self, modules: dict[str, nn.Module], step: StepFn, loader: DataLoader,
                 sampler: ChunkShuffleSampler, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int, run_dir: str | Path,
                 evaluate: Callable[[], float], device: torch.device, desc: str):
        self.modules, self.step, self.loader, self.sampler = modules, step, loader, sampler
        self.optimizer, self.scheduler, self.epochs = optimizer, scheduler, epochs
        self.run_dir, self.evaluate, self.device, self.desc = Path(run_dir), evaluate, device, desc
        self.history: list[dict] = []
        self.start_epoch = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "last.pt"

    def _save(self, epoch: int) -> None:
        checkpoint.save_state({
            "epoch": epoch,
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": self.history,
        }, self.checkpoint_path)

    def _restore(self) -> None:
        if not self.checkpoint_path.is_file():
            raise BkdError(f"--resume: no checkpoint at {self.checkpoint_path}")
        state = checkpoint.load_state(self.checkpoint_path)
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.start_epoch = state["epoch"] + 1

    def _write_history(self) -> None:
        write_json(self.history, self.run_dir / "history.json")
        keys = sorted({k for row in self.history for k in row}, key=lambda k: (k != "epoch", k))
        with open(self.run_dir / "history.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)

    def fit(self, resume: bool = False) -> list[dict]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore()
        for epoch in range(self.start_epoch, self.epochs):
            self.sampler.set_epoch(epoch)
            if hasattr(self.loader.dataset, "set_epoch"):  # e.g. which cached view each sample serves
                self.loader.dataset.set_epoch(epoch)
            for module in self.modules.values():
                module.train()
            sums: dict[str, float] = {}
            correct = seen = 0
            started = time.perf_counter()
            bar = tqdm(self.loader, desc=f"{self.desc} epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)
            for batch in bar:
                batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
                terms, logits, labels = self.step(batch)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise BkdError(f"loss became {loss.item()} in epoch {epoch + 1}; stopped, the last good "
                                   f"checkpoint is {self.checkpoint_path}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                n = len(labels)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value.item() * n
                correct += (logits.argmax(1) == labels).sum().item()
                seen += n
                bar.set_postfix(loss=f"{loss.item():.4f}")
            row = {"epoch": epoch + 1}
            row.update({f"train_{k}": v / seen for k, v in sums.items()})
            row["train_accuracy"] = correct / seen
            row["test_accuracy"] = self.evaluate()
            row["lr"] = self.scheduler.get_last_lr()[0]
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            tqdm.write(f"{self.desc} epoch {epoch + 1}/{self.epochs}: loss {row['train_loss']:.4f} "
                       f"train acc {row['train_accuracy']:.4f} test acc {row['test_accuracy']:.4f} "
                       f"({row['seconds']:.1f}s)")
            self._save(epoch)
            self._write_history()
        return self.history


def _optimizer(params, lr: float, weight_decay: float, epochs: int, steps_per_epoch: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    return optimizer, scheduler


def adopt_teacher(cfg: Config, own_weights: str) -> dict:
    """Use a user's local weights for cfg.teacher.model instead of training: check, evaluate, save."""
    from pipeline.extract import load_teacher

    test = load_split(cfg.data, "test")
    device = resolve_device(cfg.teacher.device)
    model = load_teacher(cfg, test, own_weights).to(device)
    checkpoint.save_weights(model.state_dict(), cfg.teacher.checkpoint,
                            metadata={"model": cfg.teacher.model, "source": str(own_weights)})
    return {"test_accuracy": accuracy(model, test, device), "model": cfg.teacher.model, "source": str(own_weights)}


def train_teacher(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train the timm teacher with cross-entropy; save safetensors weights at cfg.teacher.checkpoint."""
    tcfg = cfg.teacher
    device = resolve_device(tcfg.device)
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    torch.manual_seed(cfg.seed)
    model = create_teacher(tcfg, train.num_classes, train.image_shape[-3]).to(device)
    sampler = ChunkShuffleSampler(len(train), chunk_size=len(train), buffer_chunks=1, seed=cfg.seed)
    loader = DataLoader(train, batch_size=tcfg.batch_size, sampler=sampler, collate_fn=collate_batch)
    optimizer, scheduler = _optimizer(model.parameters(), tcfg.lr, tcfg.weight_decay, tcfg.epochs, len(loader))

    def step(batch):
        images, labels, _ = batch
        logits = model(random_shift(images, tcfg.random_shift))
        loss = nn.functional.cross_entropy(logits, labels)
        return {"loss": loss}, logits, labels

    trainer = Trainer({"model": model}, step, loader, sampler, optimizer, scheduler, tcfg.epochs, run_dir,
                      lambda: accuracy(model, test, device), device, "teacher")
    history = trainer.fit(resume)
    checkpoint.save_weights(model.state_dict(), tcfg.checkpoint,
                            metadata={"model": tcfg.model, "small_input_stem": str(tcfg.small_input_stem)})
    return {"test_accuracy": history[-1]["test_accuracy"], "train_accuracy": history[-1]["train_accuracy"],
            "epochs": len(history), "model": tcfg.model}


def student_step(student: nn.Module, criterion: DistillationLoss, mix: nn.Module | None = None) -> StepFn:
    """The student's forward for a batch (images, labels, teacher features, teacher logits).

    `mix` (Mixup/CutMix, distill=none only) mixes the images and turns the labels the loss sees
    into soft labels; accuracy is still counted against the hard labels.
    """

    def step(batch):
        images, labels, teacher_features, teacher_logits = batch
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        if criterion.spatial:  # distill the time-averaged map; classify its spatial mean
            distilled = student.forward_feature_map(images)
            features = distilled.mean((2, 3))
        else:
            distilled = features = student.forward_features(images)
        logits = student.forward_head(features)
        return criterion(distilled, logits, targets, teacher_features, teacher_logits), logits, labels

    return step


def batch_mixer(cfg: AugmentConfig, num_classes: int) -> nn.Module | None:
    """torchvision's MixUp / CutMix (one of them per batch when both are on), or None."""
    from torchvision.transforms import v2

    mixers = []
    if cfg.mixup > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def train_student(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train the SNN student from cached teacher targets (the teacher is never loaded)."""
    scfg = cfg.student
    device = resolve_device(scfg.device)
    run_dir = Path(run_dir)
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    targets = open_student_targets(cfg, "train", train)  # checked even for `none`: same data, same split
    torch.manual_seed(cfg.seed)
    student = create_student(scfg.model, train.num_classes, train.image_shape, scfg.timesteps,
                             **scfg.model_kwargs).to(device)
    spatial = len(targets.feature_shape) == 3
    criterion = DistillationLoss(scfg, student.num_features, targets.feature_dim, spatial).to(device)
    dataset = CachedTargetDataset(train, targets, scfg.shuffle_buffer_chunks,
                                  view_augmenter(cfg.augment, train), scfg.augment, seed=cfg.seed)
    sampler = ChunkShuffleSampler(len(dataset), targets.chunk_size, scfg.shuffle_buffer_chunks, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=scfg.batch_size, sampler=sampler, collate_fn=collate_batch)
    params = list(student.parameters()) + list(criterion.parameters())  # the BKD head trains with the student
    optimizer, scheduler = _optimizer(params, scfg.lr, scfg.weight_decay, scfg.epochs, len(loader))

    step = student_step(student, criterion, batch_mixer(cfg.augment, train.num_classes))
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    trainer = Trainer({"student": student, "criterion": criterion}, step, loader, sampler, optimizer, scheduler,
                      scfg.epochs, run_dir, lambda: accuracy(student, test, device), device,
                      f"student[{scfg.distill}]")
    history = trainer.fit(resume)
    checkpoint.save_weights(student.state_dict(), run_dir / "student.safetensors",
                            metadata={"model": scfg.model, "distill": scfg.distill})
    if not all(math.isfinite(v) for v in history[-1].values()):
        raise BkdError("training finished with non-finite metrics")
    return history[-1]
