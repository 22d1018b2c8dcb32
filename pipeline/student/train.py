"""The student recipe: train the SNN student on the engine from cached teacher targets (the teacher is
never loaded), or, with student.targets=online, from the teacher run every step (the reference,
`pipeline.student.online`). `build_student_run` returns everything a run needs; `train_student` runs it."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.augment import view_augmenter
from pipeline.config import Config
from pipeline.data import data_loader, load_splits, scattered_read_warning, scored_split
from pipeline.distributed import Ranks, process_group, split_global_batch
from pipeline.engine import StepFn, Trainer, optimizer_for
from pipeline.errors import BkdError, ConfigError
from pipeline.locations import check_locations, spiking_outputs
from pipeline.metrics import count_correct
from pipeline.rundir import RunFolder
from pipeline.samplers import ChunkShuffleSampler
from pipeline.student.fast import FastStudent, student_math
from pipeline.student.losses import DistillationLoss
from pipeline.student.models import create_student
from pipeline.student.online import FreshViews, OnlineTeacher
from pipeline.student.splits import student_splits
from pipeline.student.stream import CachedTargetDataset, student_sampler


def student_features(student: nn.Module, images: torch.Tensor, locations) -> tuple[dict, torch.Tensor]:
    """({location: feature} for `locations`, logits) from one forward of the student.

    `map` is the time-averaged last map, `pre_logits` its spatial mean (what the head classifies),
    module names their outputs averaged over T (captured during the same forward).
    """
    got, logits = spiking_outputs(student, images, locations)
    return {loc: got[loc] for loc in locations}, logits


def student_feature_shapes(student: nn.Module, sample: torch.Tensor, locations) -> dict[str, tuple[int, ...]]:
    """The per-sample shape of the student's feature at each location (one forward of one sample)."""
    check_locations(student, locations, "student.features")
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            features, _ = student_features(student, sample, locations)
    finally:
        student.train(was_training)
    for loc, value in features.items():
        if value.dim() not in (2, 4):
            raise ConfigError(f"student.features: the student's '{loc}' gives features shaped "
                              f"{tuple(value.shape[1:])} per sample; a location must give (C,) or (C, H, W)")
    return {loc: tuple(value.shape[1:]) for loc, value in features.items()}


class StudentForward(nn.Module):
    """The student's forward and its loss for a batch (images, labels, teacher features, teacher logits,
    training targets): the loss sees the training targets (hard labels, or soft ones with label
    smoothing and mixed views), accuracy the labels.

    One module, so DDP wraps (and syncs the gradients of) the student and the feature heads together.
    With `fast` (pipeline.student.fast.FastStudent) the student's forward runs under its autocast (and
    compiled) and its features and logits are cast to float32 before the loss, which runs outside autocast.
    """

    def __init__(self, student: nn.Module, criterion: DistillationLoss, fast: FastStudent | None = None):
        super().__init__()
        self.student, self.criterion, self.fast = student, criterion, fast

    def no_weight_decay(self) -> set[str]:
        """The student's own weight-decay exclusions (timm's hook, e.g. position embeddings), under this
        module's parameter names; used with student.no_decay_bias_norm."""
        return {f"student.{name}" for name in getattr(self.student, "no_weight_decay", set)()}

    def forward(self, images, labels, teacher_features, teacher_logits, targets=None):
        if self.fast is None:
            features, logits = student_features(self.student, images, self.criterion.student_locations)
        else:
            features, logits = self.fast.features(self.student, images, self.criterion.student_locations)
        targets = labels if targets is None else targets
        return self.criterion(features, logits, targets, teacher_features, teacher_logits), logits


def student_step(forward: nn.Module, teacher: OnlineTeacher | None = None, locations=()) -> StepFn:
    """A Trainer step from a `StudentForward` (or its DDP wrapper). With an online `teacher` a batch is
    (inputs, labels, training targets) and the teacher's features at `locations` and logits are computed
    from the very inputs the student trains on; otherwise the batch carries the cached ones."""

    def step(batch):
        if teacher is not None:
            images, labels, targets = batch
            batch = (images, labels, *teacher(images, locations), targets)
        terms, logits = forward(*batch)
        return terms, logits, batch[1]

    return step


def student_metadata(cfg: Config, split, epochs: int) -> dict[str, str]:
    """What a student's weights file says about itself, so it can be rebuilt and fed without the config
    (`bkd predict`): the model, its arguments, T, the classes and the input transform."""
    scfg = cfg.student
    return {"format": "bkd-student/1", "model": scfg.model, "model_kwargs": json.dumps(scfg.model_kwargs),
            "timesteps": str(scfg.timesteps), "num_classes": str(split.num_classes),
            "input_shape": json.dumps(list(split.image_shape)), "transform": json.dumps(split.transform),
            "dataset": cfg.data.name, "distill": scfg.distill, "targets": scfg.targets, "epochs": str(epochs)}


def feature_pairs(scfg, student: nn.Module, teacher_shapes: dict, sample: torch.Tensor
                  ) -> list[tuple[str, str, tuple, tuple]]:
    """(student location, teacher location, student shape, teacher shape) for each feature pair the
    distillation mode uses (`scfg.feature_pairs()`), the student's shapes from one forward of `sample`
    and the teacher's from `teacher_shapes` ({location: shape}, e.g. the store's)."""
    pairs = scfg.feature_pairs()
    if not pairs:
        return []
    shapes = student_feature_shapes(student, sample, list(pairs))
    return [(s, t, shapes[s], tuple(teacher_shapes[t])) for s, t in pairs.items()]


def train_student(cfg: Config, run_dir: str | Path, resume: bool = False, trust_store_teacher: bool = False,
                  overwrite: bool = False) -> dict:
    """Train the SNN student from cached teacher targets (the teacher is never loaded), or from the
    online teacher with student.targets=online.

    Launched by torchrun, this process is one DDP rank: it reads its own chunks of the store,
    takes student.batch_size / world_size samples per step (the global batch is the configured
    one), and only rank 0 writes the run directory, which it holds (`RunFolder`) for the whole run.
    A finished run in `run_dir` is trained over only with `overwrite`.
    """
    with process_group(cfg.student.device) as (ranks, device):
        return _train_student(cfg, Path(run_dir), resume, ranks, device, trust_store_teacher, overwrite)


def student_dataset(cfg: Config, train, targets, locations) -> CachedTargetDataset:
    """The cached-target dataset of a student run over `train` (see `pipeline.student.splits`): the recipe's
    views, the teacher locations read, label smoothing."""
    return CachedTargetDataset(train, targets, cfg.student.shuffle_buffer_chunks, view_augmenter(cfg.augment, train),
                               cfg.student.augment, seed=cfg.seed, locations=locations,
                               smoothing=cfg.student.label_smoothing)


@dataclass
class StudentRun:
    """Everything a student run needs, built as `bkd train-student` builds it (`build_student_run`).
    From the cache `targets` is the store's TeacherTargets and `teacher` None; online the reverse."""

    cfg: Config
    device: torch.device
    ranks: Ranks
    student: nn.Module
    criterion: DistillationLoss
    fast: FastStudent  # precision, compile, neuron backend
    train: object  # the ImageSplits read (from the store's images when it holds them)
    test: object
    targets: object | None  # the TeacherTargets of the train split
    dataset: CachedTargetDataset | FreshViews
    sampler: ChunkShuffleSampler
    loader: DataLoader
    forward: nn.Module  # StudentForward, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    teacher: OnlineTeacher | None = None
    step: StepFn = field(init=False)

    def __post_init__(self):
        self.step = student_step(self.forward, self.teacher, self.criterion.teacher_locations)

    def source_identity(self) -> str:
        """What the run's targets come from: the store's identity digest, or the online teacher's weights."""
        return self.targets.identity_digest() if self.teacher is None else f"online teacher sha256:{self.teacher.sha}"

    def evaluate(self) -> float:
        """Test accuracy of rank 0's model, each rank predicting every world_size-th sample."""
        ranks, device = self.ranks, self.device
        ranks.sync_buffers(self.student)
        with self.fast.autocast():  # the training forward's dtype; `bkd evaluate` reports float32 accuracy
            counts = count_correct(self.student, self.test, device, range(ranks.rank, len(self.test), ranks.world_size),
                                   self.cfg.loader)
        correct, total = ranks.sum(list(counts))
        return correct / total

    def trainer(self, run_dir: str | Path, step: StepFn | None = None) -> Trainer:
        """The engine over this run (`step`: another batch -> terms step, e.g. a benchmark's)."""
        scfg = self.cfg.student
        return Trainer(modules={"student": self.student, "criterion": self.criterion}, step=step or self.step,
                       loader=self.loader, sampler=self.sampler, optimizer=self.optimizer, scheduler=self.scheduler,
                       epochs=scfg.train_epochs(), run_dir=run_dir, evaluate=self.evaluate, device=self.device,
                       desc=f"student[{scfg.distill}]", ranks=self.ranks, checkpoint_every=scfg.checkpoint_every,
                       scaler=self.fast.grad_scaler(), evaluated_on=scored_split(self.cfg.data))


def build_student_run(cfg: Config, device: torch.device | str = "cpu", *, ranks: Ranks = Ranks(),
                      trust_store_teacher: bool = False, workers: int | None = None, log: bool = False) -> StudentRun:
    """Build a student run: check the store against the config and data (or, with student.targets=online,
    load the teacher instead), build the student (seeded with cfg.seed), the criterion of student.distill,
    the dataset, sampler and loader (`workers` processes, default loader.workers), optimizer and
    scheduler. Refusals come before heavy work. `log`: print what the run distils and its math (rank 0)."""
    device = torch.device(device)
    scfg = cfg.student
    if scfg.targets == "online" and trust_store_teacher:
        raise BkdError("--trust-store-teacher waives the check of a store's teacher, and student.targets=online "
                       "reads no store: the online teacher needs teacher.checkpoint itself")
    batch_size = split_global_batch(scfg.batch_size, ranks.world_size)
    fast = student_math(scfg, device)  # precision, compile, neuron backend: refused here if they cannot run
    if scfg.targets == "online":
        train, test = load_splits(cfg.data, ("train", "test")).values()
        targets, teacher = None, OnlineTeacher(cfg, train, device)
        source, chunk_size = teacher, cfg.extract.chunk_size  # the sample order of a cached run
        if log and ranks.is_main and (warning := scattered_read_warning(train)):
            tqdm.write(warning)
    else:  # checked even for `none`: same data, same split; pixels from the store where it holds them
        splits, stores = student_splits(cfg, trust_store_teacher, log=log and ranks.is_main)
        (train, test), teacher, targets = splits.values(), None, stores["train"]
        source, chunk_size = targets, targets.chunk_size
    torch.manual_seed(cfg.seed)
    student = create_student(scfg.model, train.num_classes, train.image_shape, scfg.timesteps,
                             **scfg.model_kwargs).to(device)
    fast.prepare(student)
    source.check_locations(scfg.feature_pairs().values())
    pairs = feature_pairs(scfg, student, source.feature_shapes, train.load([0]).to(device))
    criterion = DistillationLoss(scfg, pairs).to(device)
    if log and ranks.is_main:
        tqdm.write(f"student[{scfg.distill}] distils {criterion.describe()}")
        tqdm.write(f"student[{scfg.distill}] {fast.describe()}")
        if teacher is not None:
            tqdm.write(f"student[{scfg.distill}] targets from the {teacher.describe()}, not the store")
    if ranks.rank > 0:  # its own blur masks; rank 0 continues the one-process stream
        torch.manual_seed(ranks.seed(cfg.seed))
    if teacher is None:
        dataset = student_dataset(cfg, train, targets, criterion.teacher_locations)
    else:
        dataset = FreshViews(train, view_augmenter(cfg.augment, train), scfg.label_smoothing)
    # With loader workers, whole shuffle windows go to each worker (lanes), so each decodes its chunks once.
    workers = cfg.loader.workers if workers is None else workers
    sampler = student_sampler(cfg, len(dataset), chunk_size, batch_size, ranks.rank, ranks.world_size,
                              lanes=max(1, workers))
    loader = data_loader(dataset, batch_size, sampler, cfg.loader, device, workers=workers)
    forward = unwrapped = StudentForward(student, criterion, fast)
    if ranks.distributed:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = optimizer_for(scfg, unwrapped, len(loader))
    return StudentRun(cfg, device, ranks, student, criterion, fast, train, test, targets, dataset, sampler, loader,
                      forward, optimizer, scheduler, teacher)


def _train_student(cfg: Config, run_dir: Path, resume: bool, ranks: Ranks, device: torch.device,
                   trust_store_teacher: bool, overwrite: bool) -> dict:
    folder = RunFolder(run_dir, cfg, "student", resume, overwrite) if ranks.is_main else contextlib.nullcontext()
    if ranks.is_main:
        folder.check()  # refused before any data or store is touched; claimed once training starts
    run = build_student_run(cfg, device, ranks=ranks, trust_store_teacher=trust_store_teacher, log=True)
    if ranks.is_main:
        folder.store_identity = run.source_identity()
    with folder:
        history = run.trainer(run_dir).fit(resume)
        if ranks.is_main:
            checkpoint.save_weights(run.student.state_dict(), run_dir / "student.safetensors",
                                    metadata=student_metadata(cfg, run.train, len(history)))
            folder.finish()
    if not all(math.isfinite(v) for v in history[-1].values()):
        raise BkdError("training finished with non-finite metrics")
    return history[-1]
