"""The one training loop, and the two runs built on it: the ANN teacher and the SNN student.

`Trainer` owns epochs, optimisation, per-epoch evaluation, history and checkpoints; a run
supplies only its modules, its data and a `step` that turns a batch into loss terms.
Checkpoints (written atomically at epoch ends and every `checkpoint_every` steps) hold every
module, the optimizer, the scheduler (and the GradScaler of a float16 run), each rank's RNG state
and the history, so `resume=True`
continues bit for bit from wherever the run stopped. The student run is also a DDP rank when
launched by torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.checkpoint import write_json
from pipeline.augment import view_augmenter
from pipeline.config import Config, ScheduleConfig
from pipeline.data import data_loader, load_split, load_splits, random_shift, scattered_read_warning
from pipeline.distributed import Ranks, process_group, resolve_device, split_global_batch
from pipeline.errors import BkdError, ConfigError
from pipeline.evaluate import accuracy, count_correct
from pipeline.losses import DistillationLoss
from pipeline.models import create_student, create_teacher, load_teacher, teacher_metadata
from pipeline.models.fast import FastStudent, student_math
from pipeline.models.stages import check_locations, spiking_outputs
from pipeline.rundir import RunFolder
from pipeline.targets import StoredImages, open_student_targets
from pipeline.stream import CachedTargetDataset, ChunkShuffleSampler, student_sampler

StepFn = Callable[[tuple], tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]


@dataclass
class Tally:
    """One rank's running sums over an epoch: loss terms (sample-weighted), correct, seen."""

    sums: dict[str, float] = field(default_factory=dict)
    correct: int = 0
    seen: int = 0

    def add(self, terms: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(labels)
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.item() * n
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.seen += n

    def row(self, ranks: Ranks) -> dict[str, float]:
        """Epoch means over all ranks' samples."""
        keys = sorted(self.sums)
        *sums, correct, seen = ranks.sum([self.sums[k] for k in keys] + [self.correct, self.seen])
        row = {f"train_{k}": v / seen for k, v in zip(keys, sums)}
        row["train_accuracy"] = correct / seen
        return row


class Trainer:
    """Epochs of `step` over `loader`, on one process or as one DDP rank.

    A checkpoint records the position (epoch, step) where training continues, every module,
    the optimizer and scheduler, each rank's RNG state and running tally, and the history. It is
    written at every epoch end and, with `checkpoint_every` > 0, every that many steps; resuming
    from any of them replays the rest of the run exactly (the sampler skips the steps done).
    Only rank 0 writes files; metrics are summed over ranks.

    With a `scaler` (torch.amp.GradScaler, for float16 autocast) the loss is scaled before backward and
    the optimizer steps through it: a step whose gradients overflow is skipped (the scheduler still
    steps, as timm's AMP loop does) and the scale backs off; its state is in every checkpoint. The
    non-finite-loss stop looks at the unscaled loss, so skipped steps never trigger it.
    """

    def __init__(self, modules: dict[str, nn.Module], step: StepFn, loader: DataLoader,
                 sampler: ChunkShuffleSampler, optimizer: torch.optim.Optimizer,
                 scheduler: "torch.optim.lr_scheduler.LRScheduler | EpochSchedule", epochs: int, run_dir: str | Path,
                 evaluate: Callable[[], float], device: torch.device, desc: str,
                 ranks: Ranks = Ranks(), checkpoint_every: int = 0, scaler: "torch.amp.GradScaler | None" = None):
        self.modules, self.step, self.loader, self.sampler = modules, step, loader, sampler
        self.optimizer, self.scheduler, self.epochs = optimizer, scheduler, epochs
        self.run_dir, self.evaluate, self.device, self.desc = Path(run_dir), evaluate, device, desc
        self.ranks, self.checkpoint_every, self.scaler = ranks, checkpoint_every, scaler
        self.history: list[dict] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "last.pt"

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _save(self, epoch: int, step: int, tally: Tally) -> None:
        per_rank = self.ranks.gather({"rng": self._rng_state(), "tally": dataclasses.asdict(tally)})
        if not self.ranks.is_main:
            return
        state = {
            "epoch": epoch,
            "step": step,
            "world_size": self.ranks.world_size,
            "ranks": per_rank,
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        checkpoint.save_state(state, self.checkpoint_path)

    def _restore(self) -> tuple[int, int, Tally]:
        if not self.checkpoint_path.is_file():
            raise BkdError(f"--resume: no checkpoint at {self.checkpoint_path}")
        state = checkpoint.load_state(self.checkpoint_path)
        if "ranks" not in state:
            raise BkdError(f"--resume: {self.checkpoint_path} was written by an older bkd; train again without --resume")
        if state["world_size"] != self.ranks.world_size:
            raise BkdError(f"--resume: {self.checkpoint_path} was written by {state['world_size']} process(es); "
                           f"resume with the same number (this run has {self.ranks.world_size})")
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            if "scaler" not in state:
                raise BkdError(f"--resume: {self.checkpoint_path} holds no GradScaler state, so it was not a float16 "
                               "run; resume with the run's student.precision")
            self.scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][self.ranks.rank]
        torch.set_rng_state(mine["rng"]["cpu"])
        if "cuda" in mine["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["rng"]["cuda"], self.device)
        self.history = list(state["history"])
        return state["epoch"], state["step"], Tally(**mine["tally"])

    def _write_history(self) -> None:
        """history.json (what evaluate reads) and the same rows through dvclive (`live/`: metrics.json and
        per-metric TSVs that DVC, its VS Code extension and Studio read). dvclive's files are rewritten
        from the whole history each epoch, so a resumed run's logs equal an uninterrupted run's."""
        from dvclive import Live

        write_json(self.history, self.run_dir / "history.json")
        with contextlib.redirect_stdout(None), \
                Live(dir=str(self.run_dir / "live"), resume=False, report=None, dvcyaml=None, save_dvc_exp=False) as live:
            for row in self.history:
                live.step = row["epoch"]  # the x axis of every plot is the epoch
                for key, value in row.items():
                    if key != "epoch":
                        live.log_metric(key.replace("_", "/", 1) if key.startswith("train_") else key, value)

    def fit(self, resume: bool = False) -> list[dict]:
        if self.ranks.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        start_epoch, start_step, tally = self._restore() if resume else (0, 0, Tally())
        steps = len(self.loader)
        for epoch in range(start_epoch, self.epochs):
            first = start_step if epoch == start_epoch else 0
            if epoch != start_epoch:
                tally = Tally()
            self.sampler.set_epoch(epoch, start=first * self.loader.batch_size)
            if hasattr(self.loader.dataset, "set_epoch"):  # e.g. which cached view each sample serves
                self.loader.dataset.set_epoch(epoch)
            for module in self.modules.values():
                module.train()
            started = time.perf_counter()
            rng = torch.get_rng_state()  # a loader iterator draws a seed from the global RNG: keep that out of
            batches = iter(self.loader)  # the saved stream, or a mid-epoch resume would be one draw off
            torch.set_rng_state(rng)
            bar = tqdm(batches, desc=f"{self.desc} epoch {epoch + 1}/{self.epochs}", total=steps, initial=first,
                       leave=False, dynamic_ncols=True, disable=not self.ranks.is_main)
            for step, batch in enumerate(bar, start=first):
                batch = to_device(batch, self.device)
                terms, logits, labels = self.step(batch)
                loss = terms["loss"]
                if not self.ranks.all_true(bool(torch.isfinite(loss))):
                    raise BkdError(f"loss became non-finite in epoch {epoch + 1}, step {step + 1}; stopped, the last "
                                   f"good checkpoint is {self.checkpoint_path}")
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is None:
                    loss.backward()
                    self.optimizer.step()
                else:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
                    self.scaler.update()
                self.scheduler.step()
                tally.add(terms, logits, labels)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0 and step + 1 < steps:
                    self._save(epoch, step + 1, tally)
            for name, module in self.modules.items():
                self.ranks.check_replicas(module, name)
            row = {"epoch": epoch + 1, **tally.row(self.ranks)}
            row["test_accuracy"] = self.evaluate()
            row["lr"] = self.scheduler.get_last_lr()[0]
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            if self.ranks.is_main:
                tqdm.write(f"{self.desc} epoch {epoch + 1}/{self.epochs}: loss {row['train_loss']:.4f} "
                           f"train acc {row['train_accuracy']:.4f} test acc {row['test_accuracy']:.4f} "
                           f"({row['seconds']:.1f}s)")
            self._save(epoch + 1, 0, Tally())
            if self.ranks.is_main:
                self._write_history()
        return self.history


def make_optimizer(model: nn.Module | Iterable[nn.Parameter], lr: float, weight_decay: float, epochs: int,
                   steps_per_epoch: int, optimizer: str = "adamw", momentum: float = 0.9,
                   no_decay_bias_norm: bool = False, schedule: ScheduleConfig | None = None):
    """The optimizer and scheduler of every bkd run, built by timm's factories.

    `optimizer`: adamw, or sgd (timm's `momentum`: classical momentum, no Nesterov).
    `no_decay_bias_norm`: timm's parameter groups, biases and 1-D (norm) parameters without weight
    decay (and whatever the module's `no_weight_decay()` names); it needs `model` to be a module.
    `schedule` (default: `ScheduleConfig()`): cosine over `epochs` with timm's warmup and min lr,
    stepped per step or per epoch; the run then trains `epochs + schedule.cooldown_epochs` epochs
    at `steps_per_epoch` steps each. The scheduler is stepped once per optimizer step either way
    (see `EpochSchedule`).

    Per-step cosine without warmup or cooldown is torch's CosineAnnealingLR, the schedule bkd always
    used: timm's closed-form cosine differs from its recursive form in the last bits (~1e-15
    relative), which would change the numbers of every existing run and its checkpoints' scheduler state.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    schedule = schedule or ScheduleConfig()
    if no_decay_bias_norm:
        if not isinstance(model, nn.Module):
            raise TypeError("make_optimizer: no_decay_bias_norm needs the module (parameter names), not its parameters")
        params = model
    else:  # one group, decay on everything, as before (a module would also exclude its no_weight_decay())
        params = list(model.parameters() if isinstance(model, nn.Module) else model)
    opt = create_optimizer_v2(params, opt={"adamw": "adamw", "sgd": "momentum"}[optimizer], lr=lr,
                              weight_decay=weight_decay, momentum=momentum, filter_bias_and_bn=no_decay_bias_norm)
    steps_per_epoch = max(1, steps_per_epoch)
    if schedule.per == "step" and schedule.warmup_epochs == 0 and schedule.cooldown_epochs == 0:
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch),
                                                               eta_min=schedule.min_lr)
    scheduler, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, warmup_epochs=schedule.warmup_epochs,
                                       warmup_lr=schedule.warmup_lr, min_lr=schedule.min_lr,
                                       cooldown_epochs=schedule.cooldown_epochs,
                                       step_on_epochs=schedule.per == "epoch", updates_per_epoch=steps_per_epoch)
    return opt, EpochSchedule(scheduler, steps_per_epoch)


def optimizer_for(section, model: nn.Module, steps_per_epoch: int):
    """`make_optimizer` from a config section: its lr, weight_decay and epochs, and the optimizer and
    schedule fields it has (the student's; the teacher has none and keeps make_optimizer's defaults,
    AdamW with a per-step cosine to 0, decay on every parameter)."""
    kwargs = {name: getattr(section, name) for name in ("optimizer", "momentum", "no_decay_bias_norm", "schedule")
              if hasattr(section, name)}
    return make_optimizer(model, section.lr, section.weight_decay, section.epochs, steps_per_epoch, **kwargs)


class EpochSchedule:
    """A timm scheduler behind the interface `Trainer` drives: `step()` after every optimizer step.

    timm's schedulers are stateless about time: the training script passes the count itself,
    `step_update(num_updates)` after each update and `step(epoch)` at each epoch end (whichever the
    scheduler was not built for is a no-op). `Trainer` knows neither call; it calls `step()` per
    optimizer step and saves `state_dict()` in mid-epoch checkpoints. This adapter counts the
    updates, makes both of timm's calls exactly where timm's train script makes them (an epoch
    ends every `steps_per_epoch` updates), and keeps the count in its state, so a run resumed
    mid-epoch continues the identical lr sequence.
    """

    def __init__(self, scheduler, steps_per_epoch: int):
        self.scheduler, self.steps_per_epoch = scheduler, steps_per_epoch
        self.updates = 0

    def step(self) -> None:
        self.updates += 1
        self.scheduler.step_update(num_updates=self.updates)
        if self.updates % self.steps_per_epoch == 0:
            self.scheduler.step(self.updates // self.steps_per_epoch)

    def get_last_lr(self) -> list[float]:
        """The lr of each parameter group for the next step (as torch's schedulers report it)."""
        return [group["lr"] for group in self.scheduler.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"updates": self.updates, "steps_per_epoch": self.steps_per_epoch,
                "timm": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "timm" not in state or state.get("steps_per_epoch") != self.steps_per_epoch:
            raise BkdError("--resume: the checkpoint's learning-rate schedule is not this run's "
                           "(another schedule or another number of steps per epoch)")
        self.updates = state["updates"]
        self.scheduler.load_state_dict(state["timm"])


def adopt_teacher(cfg: Config, own_weights: str) -> dict:
    """Use a user's local weights for cfg.teacher.model instead of training: check, evaluate, save."""
    checkpoint.check_replaceable_weights(cfg.teacher.checkpoint)
    test = load_split(cfg.data, "test")
    device = resolve_device(cfg.teacher.device)
    model = load_teacher(cfg.teacher, test.num_classes, test.image_shape, own_weights).to(device)
    checkpoint.save_weights(model.state_dict(), cfg.teacher.checkpoint,
                            metadata=teacher_metadata(cfg.teacher, test, source=str(own_weights)))
    return {"test_accuracy": accuracy(model, test, device), "model": cfg.teacher.model, "source": str(own_weights)}


def train_teacher(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train the teacher (timm, or a bkd:<student> SNN) with cross-entropy; save safetensors weights at
    cfg.teacher.checkpoint (an SNN teacher with student-style metadata, so `load_teacher` can check it)."""
    folder = RunFolder(run_dir, cfg, "teacher", resume)
    folder.check()
    checkpoint.check_replaceable_weights(cfg.teacher.checkpoint)
    tcfg = cfg.teacher
    device = resolve_device(tcfg.device)
    train, test = load_splits(cfg.data, ("train", "test")).values()
    if warning := scattered_read_warning(train):
        tqdm.write(warning)
    torch.manual_seed(cfg.seed)
    model = create_teacher(tcfg, train.num_classes, train.image_shape).to(device)
    sampler = ChunkShuffleSampler(len(train), chunk_size=len(train), buffer_chunks=1, seed=cfg.seed)
    loader = data_loader(train, tcfg.batch_size, sampler, cfg.loader, device)
    optimizer, scheduler = optimizer_for(tcfg, model, len(loader))

    def step(batch):
        images, labels, _ = batch
        logits = model(random_shift(images, tcfg.random_shift))
        loss = nn.functional.cross_entropy(logits, labels)
        return {"loss": loss}, logits, labels

    trainer = Trainer({"model": model}, step, loader, sampler, optimizer, scheduler, tcfg.epochs, run_dir,
                      lambda: accuracy(model, test, device, cfg.loader), device, "teacher")
    with folder:
        history = trainer.fit(resume)
        checkpoint.save_weights(model.state_dict(), tcfg.checkpoint,
                                metadata=teacher_metadata(tcfg, train, len(history)))
    return {"test_accuracy": history[-1]["test_accuracy"], "train_accuracy": history[-1]["train_accuracy"],
            "epochs": len(history), "model": tcfg.model}


def to_device(batch, device: torch.device):
    """A batch (tensors, and dicts of them: teacher features by location) on `device`."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(to_device(value, device) for value in batch)
    return batch.to(device, non_blocking=True)


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
    With `fast` (pipeline.models.fast.FastStudent) the student's forward runs under its autocast (and
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


def student_step(forward: nn.Module) -> StepFn:
    """A Trainer step from a `StudentForward` (or its DDP wrapper)."""

    def step(batch):
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
            "dataset": cfg.data.name, "distill": scfg.distill, "epochs": str(epochs)}


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


def train_student(cfg: Config, run_dir: str | Path, resume: bool = False, trust_store_teacher: bool = False) -> dict:
    """Train the SNN student from cached teacher targets (the teacher is never loaded).

    Launched by torchrun, this process is one DDP rank: it reads its own chunks of the store,
    takes student.batch_size / world_size samples per step (the global batch is the configured
    one), and only rank 0 writes the run directory, which it holds (`RunFolder`) for the whole run.
    """
    with process_group(cfg.student.device) as (ranks, device):
        return _train_student(cfg, Path(run_dir), resume, ranks, device, trust_store_teacher)


def _train_student(cfg: Config, run_dir: Path, resume: bool, ranks: Ranks, device: torch.device,
                   trust_store_teacher: bool) -> dict:
    folder = RunFolder(run_dir, cfg, "student", resume) if ranks.is_main else contextlib.nullcontext()
    if ranks.is_main:
        folder.check()  # refused before any data or store is touched; claimed once training starts
    scfg = cfg.student
    batch_size = split_global_batch(scfg.batch_size, ranks.world_size)
    fast = student_math(scfg, device)  # precision, compile, neuron backend: refused here if they cannot run
    train, test = load_splits(cfg.data, ("train", "test")).values()
    # checked even for `none`: same data, same split
    targets = open_student_targets(cfg, "train", train, trust_store_teacher)
    if ranks.is_main:
        folder.store_identity = targets.identity_digest()
    if targets.spec.image_shape is not None and not train.in_memory:
        # the decoded pixels, not the image files; a sampler window's blocks stay decoded, like its chunks
        train = train.reading_from(StoredImages(targets, train, 2 * scfg.shuffle_buffer_chunks * targets.chunk_size))
    elif ranks.is_main and (warning := scattered_read_warning(train)):
        tqdm.write(warning)
    torch.manual_seed(cfg.seed)
    student = create_student(scfg.model, train.num_classes, train.image_shape, scfg.timesteps,
                             **scfg.model_kwargs).to(device)
    fast.prepare(student)
    targets.check_locations(scfg.feature_pairs().values())
    pairs = feature_pairs(scfg, student, targets.feature_shapes, train.load([0]).to(device))
    criterion = DistillationLoss(scfg, pairs).to(device)
    if ranks.is_main:
        tqdm.write(f"student[{scfg.distill}] distils {criterion.describe()}")
        tqdm.write(f"student[{scfg.distill}] {fast.describe()}")
    if ranks.rank > 0:  # its own blur masks; rank 0 continues the one-process stream
        torch.manual_seed(ranks.seed(cfg.seed))
    dataset = CachedTargetDataset(train, targets, scfg.shuffle_buffer_chunks,
                                  view_augmenter(cfg.augment, train), scfg.augment, seed=cfg.seed,
                                  locations=criterion.teacher_locations, smoothing=scfg.label_smoothing)
    # With loader workers, whole shuffle windows go to each worker (lanes), so each decodes its chunks once.
    sampler = student_sampler(cfg, len(dataset), targets.chunk_size, batch_size, ranks.rank, ranks.world_size)
    loader = data_loader(dataset, batch_size, sampler, cfg.loader, device)
    forward = unwrapped = StudentForward(student, criterion, fast)
    if ranks.distributed:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, scheduler = optimizer_for(scfg, unwrapped, len(loader))

    def evaluate() -> float:
        """Test accuracy of rank 0's model, each rank predicting every world_size-th sample."""
        ranks.sync_buffers(student)
        with fast.autocast():  # the training forward's dtype; `bkd evaluate` reports float32 accuracy
            counts = count_correct(student, test, device, range(ranks.rank, len(test), ranks.world_size), cfg.loader)
        correct, total = ranks.sum(list(counts))
        return correct / total

    trainer = Trainer({"student": student, "criterion": criterion}, student_step(forward), loader, sampler,
                      optimizer, scheduler, scfg.train_epochs(), run_dir, evaluate, device, f"student[{scfg.distill}]",
                      ranks, scfg.checkpoint_every, fast.grad_scaler())
    with folder:
        history = trainer.fit(resume)
        if ranks.is_main:
            checkpoint.save_weights(student.state_dict(), run_dir / "student.safetensors",
                                    metadata=student_metadata(cfg, train, len(history)))
    if not all(math.isfinite(v) for v in history[-1].values()):
        raise BkdError("training finished with non-finite metrics")
    return history[-1]
