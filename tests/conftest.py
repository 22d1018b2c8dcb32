"""Shared helpers: run the real `bkd` CLI on a tiny subset of MNIST-5k."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.cli import main

REPO = Path(__file__).resolve().parents[1]

# A few hundred samples, one epoch, small chunks so every split has several shards.
TINY = [
    "--set", "data.limit=160",
    "--set", "data.test_size=500",
    "--set", "extract.chunk_size=32",
    "--set", "extract.chunks_per_shard=2",
    "--set", "teacher.batch_size=64",
    "--set", "student.batch_size=32",
    "--set", "student.model_kwargs.widths=[8,16,32]",
    "--set", "extract.features=[pre_logits]",  # the layer maps only lasnn reads: not needed here
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_bkd(args: list[str], cwd: Path, check: bool = True) -> Result:
    """Invoke the real `bkd` click group in-process (one interpreter: no per-call import cost)."""
    with contextlib.chdir(cwd):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    out = Result(result.exit_code, result.stdout, result.stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"bkd {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def run_bkd_process(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Invoke the installed `bkd` console script in a subprocess."""
    bkd = Path(sys.executable).with_name("bkd")
    return subprocess.run([str(bkd), *args], cwd=cwd, env=env or dict(os.environ, DVC_NO_ANALYTICS="1"),
                          capture_output=True, text=True, timeout=600)


def project_with_store(tmp_path_factory, name: str, args: list[str], teacher_epochs: int) -> Path:
    """A new working directory with the configs, a teacher trained with `args`, and its store."""
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run_bkd(["train-teacher", *args, "--epochs", str(teacher_epochs)], root)
    run_bkd(["extract-teacher", *args], root)
    return root


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A working directory where the whole CLI pipeline ran once on the tiny subset."""
    root = project_with_store(tmp_path_factory, "project", TINY, teacher_epochs=1)
    run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "mixed"], root)
    run_bkd(["evaluate", *TINY, "--distill", "mixed"], root)
    return root
