"""The one training loop: `Trainer` owns epochs, optimisation, per-epoch evaluation, history and
checkpoints; a recipe (`pipeline.teacher.train`, `pipeline.student.train`) supplies only its modules,
its data and a `step` that turns a batch into loss terms.

Checkpoints (written atomically at epoch ends and every `checkpoint_every` steps) hold every
module, the optimizer, the scheduler (and the GradScaler of a float16 run), each rank's RNG state
and the history, so `resume=True` continues bit for bit from wherever the run stopped. A run
launched by torchrun is one DDP rank. `make_optimizer` is the optimizer and schedule of every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.checkpoint import write_json
from pipeline.config import ScheduleConfig
from pipeline.distributed import Ranks
from pipeline.errors import BkdError
from pipeline.rawviews import device_batches


class EpochSampler(Protocol):
    """A sampler that can start an epoch part way through (bkd's samplers all can)."""

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...


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

    def __init__(self, *, modules: dict[str, nn.Module], step: StepFn, loader: DataLoader,
                 sampler: EpochSampler, optimizer: torch.optim.Optimizer,
                 scheduler: "torch.optim.lr_scheduler.LRScheduler | EpochSchedule", epochs: int, run_dir: str | Path,
                 evaluate: Callable[[], float], device: torch.device, desc: str,
                 ranks: Ranks = Ranks(), checkpoint_every: int = 0, scaler: "torch.amp.GradScaler | None" = None,
                 evaluated_on: str = "test"):
        self.modules, self.step, self.loader, self.sampler = modules, step, loader, sampler
        self.optimizer, self.scheduler, self.epochs = optimizer, scheduler, epochs
        self.run_dir, self.evaluate, self.device, self.desc = Path(run_dir), evaluate, device, desc
        self.ranks, self.checkpoint_every, self.scaler = ranks, checkpoint_every, scaler
        self.evaluated_on = evaluated_on  # what `evaluate` scores ("test", or "validation": data.holdout)
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
            if (self.run_dir / "history.json").exists():  # an epoch was recorded: its checkpoint is missing
                raise BkdError(f"--resume: no checkpoint at {self.checkpoint_path}")
            if self.ranks.is_main:  # stopped before its first checkpoint: nothing to resume, nothing lost
                tqdm.write(f"--resume: {self.run_dir} holds no checkpoint yet (stopped before the first was "
                           "written): training from the start")
            return 0, 0, Tally()
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

    def train_step(self, batch, where: str = "") -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One optimisation step on a batch already on the device: the run's `step` (loss terms, logits,
        labels), backward (through the GradScaler of a float16 run), the optimizer and the scheduler.
        A non-finite loss on any rank stops the run before the weights change (`where` says when)."""
        terms, logits, labels = self.step(batch)
        loss = terms["loss"]
        if not self.ranks.all_true(bool(torch.isfinite(loss))):
            raise BkdError(f"loss became non-finite{' ' + where if where else ''}; stopped, the last good "
                           f"checkpoint is {self.checkpoint_path}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        self.scheduler.step()
        return terms, logits, labels

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
            for step, batch in enumerate(device_batches(bar, self.device), start=first):
                terms, logits, labels = self.train_step(batch, where=f"in epoch {epoch + 1}, step {step + 1}")
                tally.add(terms, logits, labels)
                bar.set_postfix(loss=f"{terms['loss'].item():.4f}")
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
                           f"train acc {row['train_accuracy']:.4f} {self.evaluated_on} acc {row['test_accuracy']:.4f} "
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
