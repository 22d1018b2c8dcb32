"""A teacher's weights file is replaced only when asked: training into another run folder, or adopting
other weights, over an existing teacher.checkpoint is refused without --overwrite."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY, assert_one_line, run_bkd


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def project(tiny_project: Path, tmp_path: Path) -> Path:
    """A folder with the configs and a copy of a trained teacher's weights and run folder."""
    shutil.copytree(tiny_project / "configs", tmp_path / "configs")
    shutil.copy(tiny_project / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(tiny_project / "models", tmp_path / "models")
    shutil.copytree(tiny_project / "runs/teacher", tmp_path / "runs/teacher")
    return tmp_path


def train(project: Path, *args: str):
    return run_bkd(["train-teacher", *TINY, "--epochs", "1", *args], project, check=False)


def test_training_into_another_run_folder_keeps_the_weights_unless_overwrite(project: Path):
    weights = project / "models/teacher.safetensors"
    before = sha(weights)
    refused = train(project, "--run-dir", "runs/other", "--set", "teacher.seed=7")
    assert_one_line(refused.returncode, refused.stderr, str(Path("models/teacher.safetensors")),
                    "holds other teacher weights", "--overwrite")
    assert sha(weights) == before and not (project / "runs/other").exists()  # refused before training

    replaced = train(project, "--run-dir", "runs/other", "--set", "teacher.seed=7", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    after = sha(weights)
    assert after != before
    assert json.loads((project / "runs/other/run.json").read_text())["weights_sha256"] == after


def test_the_run_that_wrote_the_weights_may_write_them_again(project: Path):
    """A run killed after writing its weights but before it was marked finished resumes and finishes;
    --overwrite of the same run folder trains it again."""
    weights = project / "models/teacher.safetensors"
    info_path = project / "runs/teacher/run.json"
    info = json.loads(info_path.read_text())
    assert info["weights_sha256"] == sha(weights)
    del info["finished"]
    info_path.write_text(json.dumps(info))
    resumed = train(project, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "finished" in json.loads(info_path.read_text())


def test_adopting_weights_over_other_weights_needs_overwrite(project: Path, tmp_path_factory):
    weights = project / "models/teacher.safetensors"
    before = sha(weights)
    other = tmp_path_factory.mktemp("own") / "other.safetensors"
    assert train(project, "--run-dir", "runs/other", "--set", "teacher.seed=7",
                 "--set", f"teacher.checkpoint={other}").returncode == 0

    refused = train(project, "--checkpoint", str(other))
    assert_one_line(refused.returncode, refused.stderr, "holds other teacher weights", "--overwrite")
    assert sha(weights) == before

    adopted = train(project, "--checkpoint", str(other), "--overwrite")
    assert adopted.returncode == 0, adopted.stderr
    assert sha(weights) != before
    again = train(project, "--checkpoint", str(other))  # the same weights again: nothing to replace
    assert again.returncode == 0, again.stderr


def test_a_file_bkd_did_not_write_is_never_replaced(project: Path):
    weights = project / "models/teacher.safetensors"
    weights.write_text("my notes")
    refused = train(project, "--run-dir", "runs/other", "--overwrite")
    assert_one_line(refused.returncode, refused.stderr, "is not a safetensors weights file")
    assert weights.read_text() == "my notes"
