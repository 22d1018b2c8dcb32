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
    assert "test accuracy" in replaced.stdout
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
    before = sha(weights)
    resumed = train(project, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "finished" in json.loads(info_path.read_text())
    # the same weights are not written again: safetensors' metadata order varies between writes, and a
    # store extracted from the file names its hash
    assert sha(weights) == before


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
    adopted_sha = sha(weights)
    for _ in range(2):  # the same weights again: nothing replaced, byte for byte
        again = train(project, "--checkpoint", str(other))
        assert again.returncode == 0, again.stderr
        assert sha(weights) == adopted_sha


def test_a_file_bkd_did_not_write_is_never_replaced(project: Path):
    weights = project / "models/teacher.safetensors"
    weights.write_text("my notes")
    refused = train(project, "--run-dir", "runs/other", "--overwrite")
    assert_one_line(refused.returncode, refused.stderr, "is not a safetensors weights file")
    assert weights.read_text() == "my notes"


def test_a_run_json_of_another_shape_is_no_traceback(project: Path):
    """run.json that is not an object records nothing: not the run's weights, so they are not its own."""
    (project / "runs/teacher/run.json").write_text("[]")
    resumed = train(project, "--resume")
    assert_one_line(resumed.returncode, resumed.stderr, "holds other teacher weights", "--overwrite")


def test_a_run_is_refused_while_another_writes_the_same_checkpoint(project: Path):
    """The final check and the write happen under CHECKPOINT.lock: another run holding it is refused."""
    from pipeline.teacher.train import weights_lock

    weights = project / "models/teacher.safetensors"
    before = sha(weights)
    with weights_lock(weights):
        busy = train(project, "--run-dir", "runs/other", "--set", "teacher.seed=7", "--overwrite")
    assert_one_line(busy.returncode, busy.stderr.splitlines()[-1] + "\n", "is being written by another bkd run")
    assert sha(weights) == before


def test_a_holdout_run_says_validation_on_stdout_and_in_its_metrics(project: Path):
    out = train(project, "--run-dir", "runs/holdout", "--set", "data.holdout=40", "--set",
                "teacher.checkpoint=models/holdout.safetensors", "--metrics", "metrics/holdout.json")
    assert out.returncode == 0, out.stderr
    assert "validation accuracy" in out.stdout and "test accuracy" not in out.stdout
    assert json.loads((project / "metrics/holdout.json").read_text())["split"] == "validation"
