"""Run folders belong to their config: resume refuses a changed config or store, a fresh run never
takes another config's or a stranger's folder, a live run locks its folder, and evaluate reads the
run it is given. End to end on the tiny project."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY, assert_refused, run_bkd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tiny_project: Path) -> str:
    run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--run-dir", "runs/owned"], tiny_project)
    return "runs/owned"


@pytest.mark.parametrize("change, field", [
    (["--set", "student.lr=0.01"], "student.lr"),
    (["--set", "student.bkd.blur_ratio=0.3"], "student.bkd.blur_ratio"),
    (["--set", "student.timesteps=3"], "student.timesteps"),
    (["--set", "student.batch_size=16"], "student.batch_size"),
    (["--epochs", "2"], "student.epochs"),
    (["--distill", "mixed"], "student.distill"),
    (["--set", "student.model_kwargs.widths=[8,16,16]"], "student.model_kwargs.widths"),
])
def test_resume_refuses_a_changed_config(tiny_project: Path, finished_run: str, change, field):
    before = (tiny_project / finished_run / "config.yaml").read_text()
    args = ["train-student", *TINY, "--epochs", "1", "--distill", "kd", *change, "--run-dir", finished_run, "--resume"]
    proc = run_bkd(args, tiny_project, check=False)
    assert_refused(proc, field)
    assert (tiny_project / finished_run / "config.yaml").read_text() == before


def test_resume_allows_result_neutral_changes(tiny_project: Path, finished_run: str):
    out = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--device", "cpu",
                   "--set", "student.checkpoint_every=3", "--run-dir", finished_run, "--resume"], tiny_project)
    assert out.returncode == 0
    info = json.loads((tiny_project / finished_run / "run.json").read_text())
    assert info["kind"] == "student" and info["command"][0] and len(info["resumed"]) >= 1
    assert "git_commit" in info


def test_resume_refuses_another_store(tiny_project: Path, finished_run: str, tmp_path: Path):
    """The student takes K from the store, so a rebuilt store could change a run silently: refused."""
    other = tmp_path / "views2.zarr"
    run_bkd(["extract-teacher", *TINY, "--views", "2", "--store", str(other)], tiny_project)
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--set", f"extract.store={other}",
                    "--run-dir", finished_run, "--resume"], tiny_project, check=False)
    assert_refused(proc, "not the one it started from")


def test_resume_from_a_truncated_checkpoint_is_one_line(tiny_project: Path, finished_run: str, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_project / finished_run, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--run-dir", str(run), "--resume"],
                   tiny_project, check=False)
    assert_refused(proc, "not a readable bkd checkpoint")


def test_fresh_run_into_another_configs_folder_is_refused(tiny_project: Path, finished_run: str):
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--set", "student.lr=0.02",
                    "--run-dir", finished_run], tiny_project, check=False)
    assert_refused(proc, "holds a run of another config")
    assert (tiny_project / finished_run / "student.safetensors").is_file()


def test_run_folder_is_locked_while_a_run_uses_it(tiny_project: Path, finished_run: str):
    from pipeline.locks import PathLock

    with PathLock(str(tiny_project / finished_run / "RUN.lock"), "run"):  # a live process (this one) holds it
        proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--run-dir", finished_run,
                        "--resume"], tiny_project, check=False)
    assert_refused(proc, "in use by another bkd process")


def test_run_dir_that_is_a_file_or_a_stranger_folder_is_refused(tiny_project: Path, tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--run-dir", str(afile)], tiny_project, check=False)
    assert_refused(proc, "is a file")
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"meow")
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--run-dir", str(stranger)], tiny_project, check=False)
    assert_refused(proc, "not a bkd run folder")
    assert (stranger / "cat.jpg").read_bytes() == b"meow"


def test_run_folder_of_files_with_bkd_names_but_no_config_is_refused(tiny_project: Path, tmp_path: Path):
    folder = tmp_path / "userrun"
    folder.mkdir()
    (folder / "run.json").write_text('{"mine": 1}')
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--run-dir", str(folder)], tiny_project, check=False)
    assert_refused(proc, "not a bkd run folder")
    assert (folder / "run.json").read_text() == '{"mine": 1}'


def test_evaluate_takes_the_run_and_refuses_contradictions(tiny_project: Path, finished_run: str, tmp_path: Path):
    base = ["evaluate", *TINY, "--distill", "kd", "--run-dir", finished_run, "--plots-dir", str(tmp_path / "p")]
    proc = run_bkd([*base, "--set", "student.timesteps=8", "--metrics", str(tmp_path / "m.json")], tiny_project,
                   check=False)
    assert_refused(proc, "student.timesteps")
    proc = run_bkd([*base, "--set", "student.model_kwargs.widths=[8,16,16]", "--metrics", str(tmp_path / "m.json")],
                   tiny_project, check=False)
    assert_refused(proc, "student.model_kwargs.widths")
    run_bkd([*base, "--set", "student.epochs=1", "--metrics", str(tmp_path / "m.json")], tiny_project)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["timesteps"] == 2 and metrics["epochs"] == 1


def test_an_interrupted_rerun_leaves_nothing_stale_to_evaluate(tiny_project: Path, finished_run: str, tmp_path: Path):
    from pipeline.config import load_config
    from pipeline.rundir import RunFolder

    run = tmp_path / "run"
    shutil.copytree(tiny_project / finished_run, run)
    cfg = load_config(tiny_project / "params.yaml",
                      [a for a in TINY if a != "--set"] + ["student.epochs=1", "student.distill=kd"])
    with RunFolder(run, cfg, "student", resume=False, overwrite=True):
        pass  # a re-run over it (asked for) that was killed right after it claimed the folder
    assert not (run / "student.safetensors").exists() and not (run / "history.json").exists()
    proc = run_bkd(["evaluate", *TINY, "--distill", "kd", "--set", "student.epochs=1", "--run-dir", str(run),
                    "--metrics", str(tmp_path / "m.json"), "--plots-dir", str(tmp_path / "p")],
                   tiny_project, check=False)
    assert_refused(proc, "no trained student")


def test_the_same_command_twice_never_deletes_a_finished_run(tiny_project: Path, finished_run: str, tmp_path: Path):
    from pipeline.checkpoint import sha256_file

    run = tmp_path / "run"
    shutil.copytree(tiny_project / finished_run, run)
    assert json.loads((run / "run.json").read_text())["finished"]
    kept = {name: sha256_file(run / name) for name in ("student.safetensors", "history.json", "last.pt", "run.json")}
    command = ["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--run-dir", str(run)]
    assert_refused(run_bkd(command, tiny_project, check=False), "holds a finished run of this config")
    assert {name: sha256_file(run / name) for name in kept} == kept  # nothing deleted, nothing touched
    assert_refused(run_bkd([*command, "--resume", "--overwrite"], tiny_project, check=False), "choose one")
    (run / "run.json").write_text(json.dumps({k: v for k, v in json.loads((run / "run.json").read_text()).items()
                                              if k != "finished"}))  # a run from before run.json said so
    assert_refused(run_bkd(command, tiny_project, check=False), "student.safetensors written")
    assert (run / "last.pt").is_file() and (run / "live").is_dir()

    run_bkd([*command, "--overwrite"], tiny_project)  # asked for: trained again, finished again
    info = json.loads((run / "run.json").read_text())
    assert info["finished"] >= info["started"] and sha256_file(run / "run.json") != kept["run.json"]


def test_the_same_teacher_command_twice_never_deletes_a_finished_run(tiny_project: Path):
    command = ["train-teacher", *TINY, "--epochs", "1", "--set", "teacher.checkpoint=models/twice.safetensors",
               "--run-dir", "runs/teacher-twice", "--metrics", "metrics/twice.json"]
    run_bkd(command, tiny_project)
    run = tiny_project / "runs/teacher-twice"
    assert json.loads((run / "run.json").read_text())["finished"]
    history = (run / "history.json").read_bytes()
    assert_refused(run_bkd(command, tiny_project, check=False), "holds a finished run of this config")
    assert (run / "history.json").read_bytes() == history
    run_bkd([*command, "--overwrite"], tiny_project)
