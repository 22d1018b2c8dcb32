"""Optimizers and learning-rate schedules: timm's recipes behind the interface Trainer drives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from timm.scheduler import create_scheduler_v2
from torch import nn

from pipeline import checkpoint
from pipeline.config import ScheduleConfig, StudentConfig, load_config
from pipeline.errors import BkdError, ConfigError
from pipeline.engine import EpochSchedule, make_optimizer, optimizer_for
from pipeline.student.train import StudentForward

MNIST5K = Path(__file__).resolve().parents[1] / "params.yaml"
# The CIFAR Spikingformer-CML recipe: AdamW 5e-4, 20 warmup epochs from 1e-5, cosine to 1e-5, 10 cooldown
# epochs; 400 cosine epochs scaled down to 60, 3 steps each.
RECIPE = ScheduleConfig(per="epoch", warmup_epochs=20, warmup_lr=1e-5, min_lr=1e-5, cooldown_epochs=10)
LR, EPOCHS, STEPS = 5e-4, 60, 3


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _bkd_lrs(schedule: ScheduleConfig | None, epochs: int = EPOCHS, steps: int = STEPS, lr: float = LR) -> list[float]:
    """The lr of every optimizer step, driven as Trainer drives it: `step()` after each step."""
    optimizer, scheduler = make_optimizer(_model(), lr, 0.06, epochs, steps, schedule=schedule)
    total = epochs + (schedule.cooldown_epochs if schedule else 0)
    lrs = []
    for _ in range(total * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _timm_lrs(schedule: ScheduleConfig, epochs: int = EPOCHS, steps: int = STEPS, lr: float = LR) -> list[float]:
    """The same, with timm's scheduler driven directly as timm's train.py drives it."""
    optimizer = torch.optim.AdamW(_model().parameters(), lr=lr)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=schedule.warmup_epochs,
        warmup_lr=schedule.warmup_lr, min_lr=schedule.min_lr, cooldown_epochs=schedule.cooldown_epochs,
        step_on_epochs=schedule.per == "epoch", updates_per_epoch=steps)
    assert num_epochs == epochs + schedule.cooldown_epochs
    lrs = []
    for epoch in range(num_epochs):
        num_updates = epoch * steps
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
        scheduler.step(epoch + 1)
    return lrs


def test_per_epoch_recipe_with_warmup_and_cooldown_is_timms():
    lrs = _bkd_lrs(RECIPE)
    assert lrs == _timm_lrs(RECIPE)
    assert len(lrs) == (EPOCHS + 10) * STEPS
    by_epoch = lrs[::STEPS]
    assert all(lrs[e * STEPS:(e + 1) * STEPS] == [by_epoch[e]] * STEPS for e in range(EPOCHS + 10))  # constant in an epoch
    assert by_epoch[0] == 1e-5
    assert by_epoch[10] == pytest.approx(1e-5 + 10 * (LR - 1e-5) / 20)
    cosine = lambda e: 1e-5 + 0.5 * (LR - 1e-5) * (1 + math.cos(math.pi * e / EPOCHS))  # noqa: E731
    assert by_epoch[20] == pytest.approx(cosine(20))
    assert by_epoch[45] == pytest.approx(cosine(45))
    assert by_epoch[EPOCHS:] == [1e-5] * 10  # cooldown at min_lr


@pytest.mark.parametrize("schedule", [
    ScheduleConfig(per="step", warmup_epochs=2, warmup_lr=1e-5, min_lr=1e-5),
    ScheduleConfig(per="step", min_lr=1e-6, cooldown_epochs=3),
    ScheduleConfig(per="epoch"),  # SEW ImageNet: cosine per epoch with T_max = epochs, to 0
])
def test_other_schedules_are_timms(schedule):
    assert _bkd_lrs(schedule) == _timm_lrs(schedule)


def test_per_step_warmup_is_linear_in_steps():
    lrs = _bkd_lrs(ScheduleConfig(per="step", warmup_epochs=2, warmup_lr=0.0), epochs=10, steps=5, lr=1e-3)
    assert lrs[:10] == pytest.approx([1e-3 * k / 10 for k in range(10)])
    # timm (warmup_prefix off): the warmup replaces the cosine's first steps, which then goes on from there
    assert lrs[10] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 10 / 50)))


def test_default_is_the_original_cosine_annealing_bit_for_bit():
    for schedule in (None, ScheduleConfig()):
        optimizer = torch.optim.AdamW(_model().parameters(), lr=LR)
        reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * STEPS)
        expected = []
        for _ in range(EPOCHS * STEPS):
            expected.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            reference.step()
        assert _bkd_lrs(schedule) == expected
    # ... and timm's closed form agrees with it to rounding
    assert _bkd_lrs(None) == pytest.approx(_timm_lrs(ScheduleConfig()), rel=1e-12, abs=1e-18)


def _decay_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    group_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)] for name, p in model.named_parameters()}


def test_no_decay_bias_norm_excludes_biases_and_norm_weights():
    model = _model()
    optimizer, _ = make_optimizer(model, LR, 0.06, EPOCHS, STEPS, no_decay_bias_norm=True)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert _decay_of(optimizer, model) == {"0.weight": 0.06, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0,
                                           "3.weight": 0.06, "3.bias": 0.0}


def test_default_decays_every_parameter_in_one_group():
    model = _model()
    optimizer, _ = make_optimizer(model, LR, 0.06, EPOCHS, STEPS)
    assert len(optimizer.param_groups) == 1
    assert set(_decay_of(optimizer, model).values()) == {0.06}
    # the parameters alone (how callers used to pass them) give the same optimizer
    again, _ = make_optimizer(model.parameters(), LR, 0.06, EPOCHS, STEPS)
    assert again.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    with pytest.raises(TypeError, match="needs the module"):
        make_optimizer(model.parameters(), LR, 0.06, EPOCHS, STEPS, no_decay_bias_norm=True)


def test_sgd_has_classical_momentum():
    model = _model()
    optimizer, _ = make_optimizer(model, 0.1, 0.0, EPOCHS, STEPS, optimizer="sgd")
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, False, 0.0)
    optimizer, _ = make_optimizer(model, 0.1, 1e-4, EPOCHS, STEPS, optimizer="sgd", momentum=0.5)
    assert optimizer.param_groups[0]["momentum"] == 0.5


def test_optimizer_for_reads_the_student_section_and_its_no_weight_decay():
    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.head = nn.Linear(8, 3)

        def no_weight_decay(self):
            return {"pos_embed"}

    forward = StudentForward(Student(), nn.Linear(2, 2))
    scfg = StudentConfig(optimizer="sgd", momentum=0.8, lr=0.1, weight_decay=0.05, no_decay_bias_norm=True,
                         schedule=ScheduleConfig(per="epoch"))
    optimizer, scheduler = optimizer_for(scfg, forward, 7)
    assert isinstance(scheduler, EpochSchedule)
    assert _decay_of(optimizer, forward) == {"student.pos_embed": 0.0, "student.head.weight": 0.05,
                                             "student.head.bias": 0.0, "criterion.weight": 0.05,
                                             "criterion.bias": 0.0}
    assert optimizer.param_groups[0]["momentum"] == 0.8
    assert StudentConfig(epochs=5, schedule=ScheduleConfig(cooldown_epochs=2)).train_epochs() == 7


@pytest.mark.parametrize("schedule", [RECIPE, ScheduleConfig(per="step", warmup_epochs=3, min_lr=1e-5)])
def test_resume_mid_epoch_continues_the_same_lr_sequence(tmp_path, schedule):
    total = (EPOCHS + schedule.cooldown_epochs) * STEPS
    expected = _bkd_lrs(schedule)
    stop = 20 * STEPS + 1  # inside epoch 21: right after the warmup for the per-epoch recipe

    optimizer, scheduler = make_optimizer(_model(), LR, 0.06, EPOCHS, STEPS, schedule=schedule)
    for _ in range(stop):
        optimizer.step()
        scheduler.step()
    checkpoint.save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                          tmp_path / "last.pt")

    state = checkpoint.load_state(tmp_path / "last.pt")  # weights_only: the state must be plain data
    optimizer, scheduler = make_optimizer(_model(), LR, 0.06, EPOCHS, STEPS, schedule=schedule)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    lrs = []
    for _ in range(total - stop):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == expected[stop:]
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]


def test_resume_with_another_schedule_shape_is_refused():
    _, scheduler = make_optimizer(_model(), LR, 0.06, EPOCHS, STEPS, schedule=RECIPE)
    _, other = make_optimizer(_model(), LR, 0.06, EPOCHS, STEPS + 1, schedule=RECIPE)
    with pytest.raises(BkdError, match="schedule"):
        other.load_state_dict(scheduler.state_dict())


@pytest.mark.parametrize("override, field", [
    ("student.optimizer=adam", "student.optimizer"),
    ("student.momentum=1.0", "student.momentum"),
    ("student.momentum=-0.1", "student.momentum"),
    ("student.schedule.per=batch", "student.schedule.per"),
    ("student.schedule.warmup_epochs=-1", "student.schedule.warmup_epochs"),
    ("student.schedule.warmup_epochs=30", "student.schedule.warmup_epochs"),  # all of student.epochs (30)
    ("student.schedule.min_lr=0.1", "student.schedule.min_lr"),  # > student.lr
    ("student.schedule.min_lr=-1e-5", "student.schedule.min_lr"),
    ("student.schedule.min_lr=.nan", "student.schedule.min_lr"),
    ("student.schedule.cooldown_epochs=-2", "student.schedule.cooldown_epochs"),
    ("student.schedule.warmup_lr=0.1", "student.schedule.warmup_lr"),  # > student.lr, with warmup_epochs=2 below
    ("student.schedule.warmup_lr=-1.0", "student.schedule.warmup_lr"),
    ("student.schedule.steps=3", "student.schedule.steps"),
    ("student.no_decay_bias_norm=1", "student.no_decay_bias_norm"),
])
def test_bad_optimisation_fields_are_refused_in_one_line(override, field):
    extra = ["student.schedule.warmup_epochs=2"] if "warmup_lr" in override else []
    with pytest.raises(ConfigError) as info:
        load_config(MNIST5K, [*extra, override])
    message = str(info.value)
    assert field in message and "\n" not in message, message


def test_the_recipes_load():
    cfg = load_config(MNIST5K, ["student.optimizer=sgd", "student.lr=0.1", "student.weight_decay=0",
                                "student.schedule={per: epoch, warmup_epochs: 2, min_lr: 1.0e-5, cooldown_epochs: 1}",
                                "student.no_decay_bias_norm=true"])
    assert cfg.student.schedule == ScheduleConfig(per="epoch", warmup_epochs=2, min_lr=1e-5, cooldown_epochs=1)
    assert cfg.student.train_epochs() == cfg.student.epochs + 1 == 31
