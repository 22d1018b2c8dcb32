"""Adversarial input: every refusal is one `bkd: error: ...` line with exit code 2, never a traceback.

Config refusals happen while loading the config, before any data or model loads; `evaluate`
with a missing run directory is the cheapest command to run them through (were a bad config
accepted, it would stop at "no trained student" instead, without naming the key).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import AugmentConfig
from pipeline.errors import BkdError, ConfigError
from tests.helpers import REPO, TINY, assert_one_line, assert_refused, run_bkd, run_bkd_process

MNIST5K = str(REPO / "params.yaml")


def refused(args: list[str], cwd: Path, *fragments: str) -> str:
    proc = run_bkd(args, cwd, check=False)
    return assert_one_line(proc.returncode, proc.stderr, *fragments)


def evaluate_refuses(tmp_path: Path, args: list[str], *fragments: str) -> str:
    return refused(["evaluate", *args, "--run-dir", str(tmp_path / "no-run")], tmp_path, *fragments)


def write(tmp_path: Path, text: str | bytes, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# 1. the YAML file

def test_duplicate_key_refused_with_line(tmp_path):
    path = write(tmp_path, "student:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    evaluate_refuses(tmp_path, ["--config", str(path)], str(path), "duplicate key 'lr'", "line 4")


def test_non_utf8_config_refused(tmp_path):
    path = write(tmp_path, b"seed: 0\n# caf\xe9 au lait\n")
    evaluate_refuses(tmp_path, ["--config", str(path)], str(path), "UTF-8")


def test_alias_bomb_refused_quickly_and_briefly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    start = time.monotonic()
    message = evaluate_refuses(tmp_path, ["--config", str(path)], str(path), "aliases")
    assert time.monotonic() - start < 2.0
    assert len(message) < 300


def test_oversized_config_refused(tmp_path):
    path = write(tmp_path, "seed: 0\n" + "# padding\n" * 200_000)  # 2 MB of comments
    evaluate_refuses(tmp_path, ["--config", str(path)], str(path), "too large")


def test_huge_bad_value_is_not_echoed(tmp_path):
    path = write(tmp_path, "student:\n  lr: " + "x" * 1_000_000 + "\n")
    message = evaluate_refuses(tmp_path, ["--config", str(path)], "student.lr", "expected a number")
    assert len(message) < 300


# 2. --set values

def test_override_with_invalid_yaml_names_the_override(tmp_path):
    evaluate_refuses(tmp_path, ["--config", MNIST5K, "--set", "student.lr=[1,"], "override 'student.lr=[1,'",
                     "not valid YAML")


@pytest.mark.parametrize("assignment", ["=3", "student.=3", ".lr=3", "student..lr=3", " . =1"])
def test_override_with_empty_key_refused(tmp_path, assignment):
    evaluate_refuses(tmp_path, ["--config", MNIST5K, "--set", assignment], "override", "empty key")


def test_override_below_a_value_refused(tmp_path):
    evaluate_refuses(tmp_path, ["--config", MNIST5K, "--set", "student.lr.x=1"], "'student.lr' is not a section")


# 3. value ranges

@pytest.mark.parametrize("assignment, fragments", [
    ("seed=-1", ("seed", "-1")),
    ("augment.seed=-2", ("augment.seed", "-2")),
    ("data.split_seed=-3", ("data.split_seed", "-3")),
    ("data.image_size=0", ("data.image_size", "0")),
    ("augment.ratio=[1, .inf]", ("augment.ratio", "inf")),
    ("extract.store=", ("extract.store", "non-empty")),
    ("extract.store='   '", ("extract.store", "non-empty")),
    ("student.out_dir=", ("student.out_dir", "non-empty")),
    ("teacher.input_size=100000", ("teacher.input_size", "100000")),
])
def test_out_of_range_values_refused(tmp_path, assignment, fragments):
    evaluate_refuses(tmp_path, ["--config", MNIST5K, "--set", assignment], *fragments)


def test_empty_store_from_unset_variable_refused_before_overwrite(tmp_path):
    # `bkd extract-teacher --store "$STORE" --overwrite` with STORE unset
    (tmp_path / "keep.txt").write_text("still here")
    refused(["extract-teacher", "--config", MNIST5K, "--store", "", "--overwrite"], tmp_path, "extract.store")
    assert (tmp_path / "keep.txt").read_text() == "still here"


@pytest.mark.parametrize("kind, key, value, shape", [
    ("pad_crop_flip", "pad", 200_000, (1, 28, 28)),
    ("pad_crop_flip", "pad", 29, (1, 28, 28)),
    ("event_flip_roll", "max_roll", 28, (10, 2, 28, 28)),
])
def test_pad_and_roll_bounded_by_image_size(kind, key, value, shape):
    from pipeline.augment import ViewAugmenter

    with pytest.raises(ConfigError, match=f"augment.{key} .*{value}"):
        ViewAugmenter(AugmentConfig(kind=kind, **{key: value}), shape)
    ViewAugmenter(AugmentConfig(kind=kind, **{key: min(value, 27)}), shape)  # within bounds: fine


@pytest.mark.parametrize("extra, fragments", [
    (["--plan", "--samples", "val=10"], ("--samples names split 'val'", "extract.splits: train, test")),
    (["--plan", "--samples", "train=0"], ("SPLIT=N with N a positive integer", "'train=0'")),
    (["--plan", "--samples", "train"], ("SPLIT=N",)),
    (["--samples", "train=10"], ("go with --plan",)),
    (["--json"], ("go with --plan",)),
    (["--calibration-rows", "8"], ("go with --plan",)),
    (["--plan", "--calibration-rows", "0"], ("--calibration-rows",)),
])
def test_extract_teacher_plan_arguments_are_checked_before_any_work(tmp_path, extra, fragments):
    refused(["extract-teacher", "--config", MNIST5K, *extra], tmp_path, *fragments)


# 4. devices

def test_extract_teacher_refuses_unknown_device(tmp_path):
    refused(["extract-teacher", "--config", MNIST5K, "--device", "tpu"], tmp_path, "'tpu'", "cuda")


def test_resolve_device_refuses_missing_gpu_index(monkeypatch):
    import torch

    from pipeline.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BkdError, match="cuda:1"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


# 5. student construction

@pytest.mark.parametrize("name, kwargs", [
    ("sew_resnet_mnist", {"widths": [0, 16, 32]}),
    ("sew_resnet_mnist", {"widths": [-1, 16, 32]}),
    ("sew_resnet_mnist", {"blocks": [0, 1, 1]}),
    ("sew_resnet_mnist", {"cnf": "XOR"}),
    ("spikformer", {"embed_dims": 0}),
])
def test_bad_model_kwargs_are_config_errors(name, kwargs):
    from pipeline.student.models import create_student

    with pytest.raises(ConfigError, match="^student.model_kwargs: "):
        create_student(name, 10, (1, 28, 28), 2, **kwargs)


def test_evaluate_refuses_zero_width_student(tmp_path):
    from pipeline.config import dump_config, load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "student.safetensors").write_bytes(b"")  # never read: the student is refused first
    (run_dir / "history.json").write_text("[]")
    dump_config(load_config(MNIST5K, ["student.model_kwargs.widths=[0,16,32]"]), run_dir / "config.yaml")
    refused(["evaluate", "--config", MNIST5K, "--set", "student.model_kwargs.widths=[0,16,32]", "--device", "cpu",
             "--run-dir", str(run_dir)], tmp_path, "student.model_kwargs", "widths")


# 6. click's usage errors

@pytest.mark.parametrize("args, fragment", [
    (["train-student", "--bogus"], "--bogus"),
    (["train-student", "--distill", "magic"], "magic"),
    (["cache", "info"], "STORE"),
    (["extract-teacher", "--workers", "0"], "--workers"),
    (["no-such-command"], "no-such-command"),
])
def test_usage_errors_are_one_line(tmp_path, args, fragment):
    refused(args, tmp_path, fragment)


def test_console_script_and_module_usage_errors_are_one_line(tmp_path):
    proc = run_bkd_process(["train-student", "--bogus"], tmp_path)
    assert_one_line(proc.returncode, proc.stderr, "--bogus")
    # `python -m stages.train_student` is what torchrun runs
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "stages.train_student", "--bogus"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_one_line(proc.returncode, proc.stderr, "--bogus", "stages.train_student")
    # --help and --version are click's own, unchanged
    help_ = run_bkd_process(["extract-teacher", "--help"], tmp_path)
    assert help_.returncode == 0 and help_.stdout.startswith("Usage: bkd extract-teacher")
    version = run_bkd_process(["--version"], tmp_path)
    assert version.returncode == 0 and "version" in version.stdout


# 7. the environment

@pytest.mark.parametrize("error, fragments", [
    (OSError(errno.ENOSPC, "No space left on device", "/full/disk/store.zarr"),
     ("No space left on device", "/full/disk/store.zarr")),
    (PermissionError(errno.EACCES, "Permission denied", "/read-only/store.zarr"),
     ("Permission denied", "/read-only/store.zarr")),
    (MemoryError(), ("out of memory",)),
])
def test_environment_errors_are_one_line(tmp_path, monkeypatch, error, fragments):
    import pipeline.targets

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline.targets, "store_info", fail)
    refused(["cache", "info", "store.zarr"], tmp_path, *fragments)


def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import pipeline.targets

    def fail(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline.targets, "store_info", fail)
    with pytest.raises(ZeroDivisionError):
        run_bkd(["cache", "info", "store.zarr"], tmp_path, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--run-dir", ""], "--run-dir is empty"),
    (["--set", "seed=99999999999999999999999"], "seed must be in"),
])
def test_an_empty_run_dir_or_an_out_of_range_seed_is_one_line(tiny_project: Path, args, fragment):
    assert_refused(run_bkd(["train-student", *TINY, "--epochs", "1", *args], tiny_project, check=False), fragment)
