"""The online-teacher reference (student.targets=online): the teacher runs every step on the very
inputs the student trains on, computes what the cache holds for the same view, resumes exactly, is
recorded in the run, and contradicting settings are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.augment import view_augmenter
from pipeline.config import load_config
from pipeline.data import load_splits
from pipeline.rawviews import to_device
from pipeline.student import train
from pipeline.student.online import FreshViews, OnlineTeacher
from pipeline.student.stream import CachedTargetDataset
from pipeline.targets import TeacherTargets
from tests.helpers import TINY, assert_refused, resumed_equals_straight, run_bkd

ONLINE = [*TINY, "--set", "student.targets=online"]
SETTINGS = [a for a in TINY if a != "--set"]


def _config(*extra: str):
    return load_config("params.yaml", [*SETTINGS, *extra])


@pytest.fixture(scope="module")
def views_store(tiny_project: Path) -> Path:
    """A float32 store of 3 views per training sample (views 1 and 2 augmented) of the tiny project's teacher."""
    run_bkd(["extract-teacher", *TINY, "--set", "extract.views=3", "--set", "extract.feature_dtype=float32",
             "--set", "extract.logits_dtype=float32", "--set", "extract.store=cache/views-f32.zarr"], tiny_project)
    return tiny_project / "cache/views-f32.zarr"


def test_online_targets_equal_the_cached_targets_of_the_same_view(tiny_project, views_store, monkeypatch):
    monkeypatch.chdir(tiny_project)
    cfg = _config("extract.views=3", f"extract.store={views_store}")
    split = load_splits(cfg.data, ("train",))["train"]
    targets = TeacherTargets(str(views_store), "train")
    cached = CachedTargetDataset(split, targets, 2, view_augmenter(cfg.augment, split), seed=cfg.seed)
    teacher = OnlineTeacher(cfg, split, torch.device("cpu"))
    assert teacher.feature_shapes == targets.feature_shapes
    served = set()
    for epoch in range(3):  # the schedule serves every view, augmented ones included
        images, _, features, logits, _ = cached.__getitems__([(epoch, i) for i in range(0, 64, 3)])
        served |= set(cached.schedule[:64:3].tolist())
        online_features, online_logits = teacher(images.to("cpu"), list(targets.feature_shapes))
        torch.testing.assert_close(online_logits, logits, rtol=1e-4, atol=1e-4)
        for loc, value in features.items():
            torch.testing.assert_close(online_features[loc], value, rtol=1e-4, atol=1e-4)
    assert served == {0, 1, 2}


def test_the_teacher_sees_exactly_what_the_student_trains_on(tiny_project, monkeypatch, tmp_path):
    monkeypatch.chdir(tiny_project)
    run = train.build_student_run(_config("student.targets=online"))
    assert run.targets is None and isinstance(run.dataset, FreshViews)
    seen = {}
    outputs = run.teacher.fast.outputs

    def teacher_outputs(images, locations):
        seen["teacher"] = images.clone()
        got = outputs(images, locations)
        seen["targets"] = got
        return got

    run.teacher.fast.outputs = teacher_outputs
    student_forward = run.forward.forward

    def record_student(images, labels, teacher_features, teacher_logits, targets=None):
        seen["student"], seen["criterion"] = images.clone(), (teacher_features, teacher_logits)
        return student_forward(images, labels, teacher_features, teacher_logits, targets)

    run.forward.forward = record_student
    batch = next(iter(run.loader))
    run.trainer(tmp_path / "run").train_step(to_device(batch, run.device))
    assert torch.equal(seen["teacher"], seen["student"]) and torch.equal(seen["teacher"], batch[0].to("cpu"))
    features, logits = seen["criterion"]
    torch.testing.assert_close(logits, seen["targets"][1].float())
    assert set(features) == set(run.criterion.teacher_locations)
    # a fresh view per epoch, the same one for the same (epoch, sample): a resumed run draws it again
    first = run.dataset.__getitems__([(0, i) for i in range(8)])[0].to("cpu")
    assert torch.equal(first, run.dataset.__getitems__([(0, i) for i in range(8)])[0].to("cpu"))
    assert not torch.equal(first, run.dataset.__getitems__([(1, i) for i in range(8)])[0].to("cpu"))


def test_online_run_resumes_exactly_and_is_recorded(tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)
    cfg = _config("student.targets=online", "student.epochs=2", "extract.store=cache/never-written.zarr",
                  "data.limit=96")  # three steps an epoch
    resumed_equals_straight(monkeypatch, cfg, tiny_project, "online")  # no store: none is read
    assert not (tiny_project / "cache/never-written.zarr").exists()

    run_dir = tiny_project / "runs/online-straight"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["store"].startswith("online teacher sha256:")
    with safe_open(str(run_dir / "student.safetensors"), "pt") as fh:
        assert fh.metadata()["targets"] == "online"
    # never taken for a cached run: resuming it from the cache is refused, naming the field
    refused = run_bkd(["train-student", *TINY, "--epochs", "2", "--set", "extract.store=cache/never-written.zarr",
                       "--set", "data.limit=96", "--run-dir", str(run_dir), "--resume"], tiny_project, check=False)
    assert_refused(refused, "student.targets")
    # evaluated without a store too; the report says where its targets came from
    run_bkd(["evaluate", *ONLINE, "--set", "student.epochs=2", "--set", "extract.store=cache/never-written.zarr",
             "--set", "data.limit=96",
             "--run-dir", str(run_dir), "--metrics", "online.json", "--report", "online-report.json",
             "--plots-dir", "plots/online"], tiny_project)
    report = json.loads((tiny_project / "online-report.json").read_text())
    assert report["targets"] == "online" and report["scored_on"] == "test"
    assert 0 < json.loads((tiny_project / "online.json").read_text())["teacher_top1"] <= 1


@pytest.mark.parametrize("args, fragment", [
    (["--set", "student.augment=online"], "student.augment"),
    (["--trust-store-teacher"], "--trust-store-teacher"),
    (["--set", "teacher.checkpoint=models/absent.safetensors"], "teacher checkpoint not found"),
    (["--set", "teacher.checkpoint=models/absent.safetensors", "--nproc", "2"], "teacher checkpoint not found"),
    (["--distill", "lasnn"], "not in extract.features"),
])
def test_contradicting_settings_are_refused_in_one_line(tiny_project, args, fragment):
    proc = run_bkd(["train-student", *ONLINE, "--epochs", "1", "--run-dir", "runs/online-refused", *args],
                   tiny_project, check=False)
    assert_refused(proc, fragment)
    assert not (tiny_project / "runs/online-refused/student.safetensors").exists()
