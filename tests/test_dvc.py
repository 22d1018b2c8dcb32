"""`dvc repro` of the real dvc.yaml in a temporary copy of the repository, on tiny parameters."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY_PARAMS = {
    "data": {"limit": 160, "test_size": 500},
    "teacher": {"epochs": 1, "batch_size": 64},
    "extract": {"chunk_size": 32, "chunks_per_shard": 2},
    "student": {"epochs": 1, "batch_size": 32, "model_kwargs": {"widths": [8, 16, 32], "blocks": [1, 1, 1]}},
}
MODES = ["none", "mixed"]  # two of the five matrix entries keep the test short


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def dvc_copy(tmp_path_factory) -> Path:
    """A git repository holding the project's files (tracked and new), with tiny params and two modes."""
    root = tmp_path_factory.mktemp("dvc-repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if not (REPO / name).is_file():  # deleted in the working tree
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    _merge(params, TINY_PARAMS)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml = (root / "dvc.yaml").read_text()
    dvc_yaml = re.sub(r"modes: \[[^\]]*\]", f"modes: [{', '.join(MODES)}]", dvc_yaml, count=1)
    (root / "dvc.yaml").write_text(dvc_yaml)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(command, cwd=root, check=True)
    return root


def test_repro_runs_every_stage_then_nothing(dvc_copy):
    first = _run(["dvc", "repro"], dvc_copy)
    expected = {"train_teacher", "extract_teacher"} | {f"{stage}@{mode}" for stage in ("train_student", "evaluate")
                                                       for mode in MODES}
    assert _stages_run(first) == expected
    for mode in MODES:
        metrics = json.loads((dvc_copy / f"metrics/student-{mode}.json").read_text())
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (dvc_copy / "dvc.lock").is_file()

    second = _run(["dvc", "repro"], dvc_copy)
    assert _stages_run(second) == set()

    shown = _run(["dvc", "metrics", "show"], dvc_copy)
    for mode in MODES:
        assert f"metrics/student-{mode}.json" in shown


def test_student_param_experiment_reruns_only_student_stages(dvc_copy):
    if not (dvc_copy / "dvc.lock").is_file():
        _run(["dvc", "repro"], dvc_copy)
    _run(["git", "add", "-A"], dvc_copy)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], dvc_copy)
    output = _run(["dvc", "exp", "run", "-S", "student.lr=0.003"], dvc_copy)
    ran = _stages_run(output)
    assert "train_teacher" not in ran and "extract_teacher" not in ran
    assert {f"train_student@{mode}" for mode in MODES} <= ran
