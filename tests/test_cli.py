"""The four stage commands end to end on a tiny subset, and their refusals of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import pytest
import zarr

from tests.helpers import TINY, resumed_equals_straight, run_bkd, run_bkd_process

STORE = "cache/mnist5k-resnet18.zarr"

pytestmark = pytest.mark.slow


def test_pipeline_outputs(tiny_project: Path):
    teacher = json.loads((tiny_project / "metrics/teacher.json").read_text())
    assert 0.0 <= teacher["test_accuracy"] <= 1.0
    assert (tiny_project / "models/teacher.safetensors").is_file()

    info = json.loads(run_bkd(["cache", "info", STORE, "--json"], tiny_project).stdout)
    assert info["complete"] is True
    assert info["splits"]["train"] == {"samples": 160, "views": 1, "shards_complete": 3, "shards_total": 3}
    assert info["splits"]["test"] == {"samples": 160, "views": 1, "shards_complete": 3, "shards_total": 3}
    assert info["views"] == {"train": 1, "test": 1}
    assert info["manifest"]["teacher"]["num_features"] == 512
    assert info["bytes_on_disk"] > 0

    root = zarr.open_group(str(tiny_project / STORE), mode="r")
    features = root["train/features.pre_logits"]
    assert features.shape == (160, 1, 512) and features.dtype == np.float16
    assert features.chunks == (32, 1, 512) and features.shards == (64, 1, 512)
    assert np.array_equal(root["train/index"][:], np.arange(160))

    run_dir = tiny_project / "runs/students/mixed"
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1 and {"train_ce", "train_bkd", "train_wsld", "test_accuracy"} <= set(history[0])
    metrics = json.loads((tiny_project / "metrics/student-mixed.json").read_text())
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["top1"] == pytest.approx(history[-1]["test_accuracy"])  # the trained model, evaluated again
    assert metrics["best_epoch"] == 1 and metrics["timesteps"] == 2
    # The teacher's accuracy in evaluate comes from the cached logits: it must match stage one's.
    assert metrics["teacher_top1"] == pytest.approx(teacher["test_accuracy"], abs=1e-6)
    assert metrics["sops_per_sample"] > 0 and metrics["energy_mj_per_sample"] > 0
    report = json.loads((tiny_project / "reports/student-mixed.json").read_text())
    assert report["distill"] == "mixed"
    rates = report["firing_rates"]
    assert len(rates) == 9 and all(0.0 <= r <= 1.0 for r in rates.values())
    assert min(rates.values()) <= metrics["firing_rate"] <= max(rates.values())
    ops = report["operations"]
    assert all(op["sops"] >= 0 and op["macs"] > 0 for op in ops.values())
    assert [name for name, op in ops.items() if op["kind"] == "analog"] == ["stem.0"]  # only the encoding layer
    assert metrics["sops_per_sample"] == pytest.approx(sum(op["sops"] for op in ops.values()))
    for png in ("training_curves.png", "layers.png"):
        assert (tiny_project / "plots/mixed" / png).read_bytes()[:4] == b"\x89PNG"


def test_help_for_every_command(tiny_project: Path):
    for command in ("train-teacher", "extract-teacher", "train-student", "evaluate", "cache"):
        proc = run_bkd_process([command, "--help"], tiny_project)  # the installed console script
        assert proc.returncode == 0 and "Usage: bkd" in proc.stdout


def test_cache_verify_flags_corrupted_chunk(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    assert run_bkd(["cache", "verify", str(store)], tiny_project).returncode == 0
    shard_file = store / "train/features.pre_logits/c/1/0/0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\x00" * 64  # inside a compressed chunk
    shard_file.write_bytes(bytes(data))
    proc = run_bkd(["cache", "verify", str(store)], tiny_project, check=False)
    assert proc.returncode == 1
    assert "bad shard train/1" in proc.stderr
    assert "train/0" not in proc.stderr and "train/2" not in proc.stderr


def test_student_refuses_store_of_another_split(tiny_project: Path):
    proc = run_bkd(["train-student", *TINY, "--set", "data.split_seed=1", "--run-dir", "runs/refused"],
                   tiny_project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("bkd: error:") and "dataset.split_seed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tiny_project / "runs/refused").exists()


def test_student_refuses_store_of_another_teacher(tiny_project: Path, tmp_path: Path):
    other = tmp_path / "other-teacher.safetensors"
    data = bytearray((tiny_project / "models/teacher.safetensors").read_bytes())
    data[-4:] = b"\x01\x02\x03\x04"  # different weights, different sha256
    other.write_bytes(bytes(data))
    proc = run_bkd(["train-student", *TINY, "--set", f"teacher.checkpoint={other}", "--run-dir", "runs/refused"],
                   tiny_project, check=False)
    assert proc.returncode == 2 and "teacher.checkpoint_sha256" in proc.stderr


def test_incomplete_store_is_refused(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "partial.zarr"
    shutil.copytree(tiny_project / STORE, store)
    root = zarr.open_group(str(store), mode="r+")
    root.attrs["complete"] = False
    proc = run_bkd(["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"],
                   tiny_project, check=False)
    assert proc.returncode == 2 and "incomplete" in proc.stderr


def test_extract_refuses_other_runs_store_without_overwrite(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    proc = run_bkd(["extract-teacher", *TINY, "--set", "data.split_seed=3", "--store", str(store)],
                   tiny_project, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "student.bkd.blur_ratio=1.0"], "blur_ratio"),
    (["--set", "student.timesteps=0"], "timesteps"),
    (["--set", "student.no_such_key=1"], "student.no_such_key"),
    (["--config", "configs/missing.yaml"], "config file not found"),
    (["--set", "student.model=resnet_of_dreams"], "unknown student"),
])
def test_bad_input_is_one_line_exit_2(tiny_project: Path, args, message):
    proc = run_bkd(["train-student", *TINY, *args, "--run-dir", "runs/refused"], tiny_project, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tiny_project / "runs/refused").exists()


def test_the_public_builder_trains_what_train_student_trains(tiny_project: Path, monkeypatch):
    """`build_student_run` is the run `bkd train-student` trains: its engine gives the same weights."""
    from pipeline.checkpoint import load_weights
    from pipeline.config import load_config
    from pipeline.student.train import build_student_run, train_student

    monkeypatch.chdir(tiny_project)
    cfg = load_config("params.yaml", [a for a in TINY if a != "--set"] + ["student.epochs=1"])
    train_student(cfg, "runs/by-recipe")
    run = build_student_run(cfg)
    assert run.criterion.describe() and len(run.loader) == len(run.sampler) // cfg.student.batch_size + \
        bool(len(run.sampler) % cfg.student.batch_size)
    history = run.trainer("runs/by-builder").fit()
    assert history[-1]["epoch"] == 1
    recipe = load_weights(tiny_project / "runs/by-recipe/student.safetensors")
    for name, value in run.student.state_dict().items():
        assert torch.equal(value, recipe[name]), name


def test_resume_after_interruption_matches_uninterrupted_run(tiny_project: Path, monkeypatch):
    """Weights, optimizer, scheduler and RNG (blur masks) all restored: the same final weights."""
    from pipeline.config import load_config

    monkeypatch.chdir(tiny_project)
    cfg = load_config("params.yaml", [a for a in TINY if a != "--set"] + ["student.epochs=2"])
    resumed_equals_straight(monkeypatch, cfg, tiny_project, "interrupted")  # killed after epoch 1's checkpoint
    history = json.loads((tiny_project / "runs/interrupted-resumed/history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]


def test_adopt_own_teacher_weights(tiny_project: Path, tmp_path: Path):
    own = tmp_path / "mine.safetensors"
    shutil.copy(tiny_project / "models/teacher.safetensors", own)
    proc = run_bkd(["train-teacher", *TINY, "--checkpoint", str(own), "--set",
                    f"teacher.checkpoint={tmp_path / 'adopted.safetensors'}", "--metrics", str(tmp_path / "m.json")],
                   tiny_project)
    assert "test accuracy" in proc.stdout
    adopted = json.loads((tmp_path / "m.json").read_text())
    teacher = json.loads((tiny_project / "metrics/teacher.json").read_text())
    assert adopted["test_accuracy"] == pytest.approx(teacher["test_accuracy"])

    wrong = run_bkd(["train-teacher", *TINY, "--checkpoint", str(own), "--set", "teacher.model=resnet34",
                     "--set", f"teacher.checkpoint={tmp_path / 'x.safetensors'}"], tiny_project, check=False)
    assert wrong.returncode == 2 and "does not fit teacher.model 'resnet34'" in wrong.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_eight_views_end_to_end(tiny_project: Path):
    """One extraction with K = 8 views feeds training and evaluation through the CLI."""
    store = "cache/views8.zarr"
    args = [*TINY, "--set", f"extract.store={store}"]
    run_bkd(["extract-teacher", *args, "--views", "8"], tiny_project)
    info = json.loads(run_bkd(["cache", "info", store, "--json"], tiny_project).stdout)
    assert info["views"] == {"train": 8, "test": 1}
    assert info["manifest"]["augment"]["kind"] == "pad_crop_flip"
    assert zarr.open_group(str(tiny_project / store), mode="r")["train/view_params"].shape == (160, 8, 3)
    assert run_bkd(["cache", "verify", store], tiny_project).returncode == 0

    # Training takes K from the store: its config (K = 1 by default) need not repeat it.
    trained = [*args, "--run-dir", "runs/views8"]
    run_bkd(["train-student", *trained, "--epochs", "2"], tiny_project)
    run_bkd(["evaluate", *trained, "--metrics", "metrics/views8.json", "--plots-dir", "plots/views8"], tiny_project)
    metrics = json.loads((tiny_project / "metrics/views8.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["top1"] <= 1.0


def test_bkd_on_teacher_feature_maps(tiny_project: Path):
    """extract.features=[map] stores (C, H, W) teacher maps; a student map distilled to it runs BKD map to
    map (3x3 convolutions on the map); asking for a location the store lacks is one line, before training."""
    args = [*TINY, "--set", "extract.store=cache/maps.zarr", "--set", "extract.features=[map]"]
    run_bkd(["extract-teacher", *args], tiny_project)
    features = zarr.open_group(str(tiny_project / "cache/maps.zarr"), mode="r")["train/features.map"]
    assert features.shape == (160, 1, 512, 2, 2)  # ResNet-18 layer4 on 28x28 with the small stem
    student = [*TINY, "--set", "extract.store=cache/maps.zarr"]
    refused = run_bkd(["train-student", *student, "--epochs", "1", "--run-dir", "runs/nomaps"], tiny_project,
                      check=False)
    assert refused.returncode == 2 and "holds no teacher features at 'pre_logits'" in refused.stderr
    assert not (tiny_project / "runs/nomaps").exists()
    student += ["--set", "student.features={map: map}"]
    run_bkd(["train-student", *student, "--epochs", "1", "--run-dir", "runs/maps"], tiny_project)
    history = json.loads((tiny_project / "runs/maps/history.json").read_text())
    assert history[0]["train_bkd"] > 0
    state = torch.load(tiny_project / "runs/maps/last.pt", weights_only=True)["modules"]["criterion"]
    assert state["feature_terms.0.generation.0.weight"].shape == (512, 512, 3, 3)  # the spatial generation block
