"""Teacher weights, metrics and plots are written only over files bkd wrote: a user's file at an
output path is refused in one line and left as it was. End to end on the tiny project."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, assert_refused, run_bkd

pytestmark = pytest.mark.slow


def test_teacher_weights_and_metrics_never_overwrite_user_files(tiny_project: Path, tmp_path: Path):
    notes = tmp_path / "notes.yaml"
    notes.write_text("my: notes\n")
    proc = run_bkd(["train-teacher", *TINY, "--epochs", "1", "--set", f"teacher.checkpoint={notes}",
                    "--run-dir", str(tmp_path / "t")], tiny_project, check=False)
    assert_refused(proc, "not a safetensors weights file")
    assert notes.read_text() == "my: notes\n"
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    proc = run_bkd(["evaluate", *TINY, "--distill", "mixed", "--metrics", str(table)], tiny_project, check=False)
    assert_refused(proc, "not a JSON file")
    assert table.read_text() == "a,b\n1,2\n"


def test_plots_never_overwrite_user_files(tiny_project: Path, tmp_path: Path):
    folder = tmp_path / "userplots"
    folder.mkdir()
    (folder / "layers.png").write_bytes(b"my own picture")
    proc = run_bkd(["evaluate", *TINY, "--distill", "mixed", "--plots-dir", str(folder),
                    "--metrics", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.json")],
                   tiny_project, check=False)
    assert_refused(proc, "not a plot bkd wrote")
    assert (folder / "layers.png").read_bytes() == b"my own picture" and not (tmp_path / "m.json").exists()
    (folder / "layers.png").unlink()
    args = ["evaluate", *TINY, "--distill", "mixed", "--plots-dir", str(folder), "--metrics", str(tmp_path / "m.json"),
            "--report", str(tmp_path / "r.json")]
    run_bkd(args, tiny_project)
    run_bkd(args, tiny_project)  # its own plots are replaced
