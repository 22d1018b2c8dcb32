"""The training loop itself: mid-epoch checkpoints, exact resume, and stopping on a non-finite loss."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline import checkpoint
from pipeline.config import ScheduleConfig
from pipeline.errors import BkdError
from pipeline.samplers import ChunkShuffleSampler
from pipeline.engine import Trainer, make_optimizer

N, CHUNK, BATCH, EPOCHS = 96, 16, 8, 3  # 12 steps per epoch


class Crash(Exception):
    """Stands in for the process dying part-way through an epoch."""


# timm's path: per-epoch cosine with warmup and a cooldown epoch (4 epochs in all)
RECIPE = ScheduleConfig(per="epoch", warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5, cooldown_epochs=1)


def _trainer(run_dir, fail_at: int | None = None, nan_at: int | None = None, checkpoint_every: int = 5,
             schedule: ScheduleConfig | None = None):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(N, 6), torch.randint(0, 3, (N,)))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))  # dropout: RNG matters
    sampler = ChunkShuffleSampler(N, CHUNK, 2, seed=1)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    optimizer, scheduler = make_optimizer(model.parameters(), 1e-2, 1e-4, EPOCHS, len(loader), schedule=schedule)
    epochs = EPOCHS + (schedule.cooldown_epochs if schedule else 0)
    calls = {"n": 0}

    def step(batch):
        x, y = batch
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Crash
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if calls["n"] == nan_at:
            loss = loss * float("nan")
        return {"loss": loss}, logits, y

    trainer = Trainer(modules={"model": model}, step=step, loader=loader, sampler=sampler, optimizer=optimizer,
                      scheduler=scheduler, epochs=epochs, run_dir=run_dir, evaluate=lambda: 0.5,
                      device=torch.device("cpu"), desc="test", checkpoint_every=checkpoint_every)
    return trainer, model


@pytest.mark.parametrize("schedule", [None, RECIPE], ids=["default", "timm-recipe"])
def test_crash_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, schedule):
    reference, ref_model = _trainer(tmp_path / "ref", schedule=schedule)
    ref_history = reference.fit()
    assert len(ref_history) == EPOCHS + (schedule.cooldown_epochs if schedule else 0)
    if schedule:  # the lr logged at each epoch end is the next epoch's: cosine, then the cooldown at min_lr
        assert [row["lr"] for row in ref_history][-2:] == [1e-5, 1e-5]

    crashed, _ = _trainer(tmp_path / "run", fail_at=12 + 8, schedule=schedule)  # epoch 2, step 8: after step 5
    with pytest.raises(Crash):
        crashed.fit()
    state = checkpoint.load_state(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 5)  # continues at epoch index 1, step 5
    assert state["ranks"][0]["tally"]["seen"] == 5 * BATCH

    resumed, model = _trainer(tmp_path / "run", schedule=schedule)
    history = resumed.fit(resume=True)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in ref_history]


def test_resume_before_the_first_checkpoint_trains_from_the_start(tmp_path):
    """Killed before its first checkpoint (a loader worker OOM-killed in step 1), --resume starts over: nothing was
    finished, and the run equals an uninterrupted one; once an epoch is recorded, a missing checkpoint is an error."""
    reference, ref_model = _trainer(tmp_path / "ref")
    reference.fit()
    crashed, _ = _trainer(tmp_path / "run", fail_at=3)  # before step 5's checkpoint
    with pytest.raises(Crash):
        crashed.fit()
    assert not (tmp_path / "run" / "last.pt").exists()
    resumed, model = _trainer(tmp_path / "run")
    resumed.fit(resume=True)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    (tmp_path / "run" / "last.pt").unlink()  # history.json records epochs: their checkpoint is gone
    again, _ = _trainer(tmp_path / "run")
    with pytest.raises(BkdError, match="--resume: no checkpoint at"):
        again.fit(resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer, _ = _trainer(tmp_path, nan_at=12 + 7)  # epoch 2, step 7
    with pytest.raises(BkdError, match=r"non-finite in epoch 2, step 7.*last.pt") as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    state = checkpoint.load_state(tmp_path / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 5)  # the step-5 checkpoint, written before the bad step
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values())


def test_resume_with_another_process_count_is_refused(tmp_path):
    trainer, _ = _trainer(tmp_path)
    trainer.fit()
    state = checkpoint.load_state(tmp_path / "last.pt")
    state["world_size"] = 2
    checkpoint.save_state(state, tmp_path / "last.pt")
    again, _ = _trainer(tmp_path)
    with pytest.raises(BkdError, match="written by 2 process"):
        again.fit(resume=True)


def test_checkpoint_every_zero_saves_only_at_epoch_ends(tmp_path):
    trainer, _ = _trainer(tmp_path, fail_at=12 + 8, checkpoint_every=0)
    with pytest.raises(Crash):
        trainer.fit()
    state = checkpoint.load_state(tmp_path / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0)


def test_the_engine_takes_keyword_arguments_only():
    with pytest.raises(TypeError):
        Trainer({}, None, None, None, None, None, 1, "run", lambda: 0.0, torch.device("cpu"), "test")


def test_epoch_values_are_sample_weighted_means_with_a_short_last_batch(tmp_path):
    """20 samples in batches of 8: 8, 8 and a short 4. Each train_* value is the mean over the epoch's
    samples (batch means weighted by batch size), and train_accuracy the fraction right."""
    n, batch = 20, 8
    x = torch.arange(n, dtype=torch.float32).view(-1, 1)
    y = (torch.arange(n) % 3).long()
    sampler = ChunkShuffleSampler(n, 8, 1, seed=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, sampler=sampler)
    model = nn.Linear(1, 3)
    optimizer, scheduler = make_optimizer(model.parameters(), 1e-2, 0.0, 2, len(loader))
    seen: list[tuple[int, float]] = []

    def step(batch):
        xb, yb = batch
        logits = model(xb)
        loss = nn.functional.cross_entropy(logits, yb)
        seen.append((len(yb), loss.item()))
        # the label wins exactly where the sample id is even: accuracy 10/20 however batches fall
        controlled = nn.functional.one_hot(torch.where(xb[:, 0] % 2 == 0, yb, (yb + 1) % 3), 3).float()
        terms = {"loss": loss, "size": torch.tensor(float(len(yb))), "id": xb.mean()}
        return terms, controlled, yb

    trainer = Trainer(modules={"model": model}, step=step, loader=loader, sampler=sampler, optimizer=optimizer,
                      scheduler=scheduler, epochs=2, run_dir=tmp_path, evaluate=lambda: 0.0,
                      device=torch.device("cpu"), desc="test")
    history = trainer.fit()
    assert [n_b for n_b, _ in seen] == [8, 8, 4] * 2
    for epoch, row in enumerate(history):
        batches = seen[3 * epoch:3 * epoch + 3]
        assert row["train_size"] == pytest.approx((8 * 8 + 8 * 8 + 4 * 4) / n, rel=1e-12)  # 7.2, not 20/3
        assert row["train_id"] == pytest.approx(sum(range(n)) / n, rel=1e-12)  # the mean id, 9.5
        assert row["train_loss"] == pytest.approx(sum(n_b * loss for n_b, loss in batches) / n, rel=1e-12)
        assert row["train_accuracy"] == 0.5
    assert history[0]["train_loss"] != history[1]["train_loss"]  # the tally starts again each epoch
    recorded = json.loads((tmp_path / "history.json").read_text())
    assert [{k: v for k, v in r.items() if k.startswith("train_")} for r in recorded] == \
           [{k: v for k, v in r.items() if k.startswith("train_")} for r in history]
