"""Fixtures shared by the test modules; the helpers they use live in tests/helpers.py."""

from __future__ import annotations

import os

# One intra-op thread per test process, set before torch is imported and inherited by every `bkd`
# subprocess, DDP rank and loader worker: `make test` already runs one pytest worker per core, and
# torch's default (a thread per core in each process) oversubscribes the cores several times over.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from pathlib import Path  # noqa: E402

import pytest

from tests.helpers import TINY, project_with_store, run_bkd


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A working directory where the whole CLI pipeline ran once on the tiny subset."""
    root = project_with_store(tmp_path_factory, "project", TINY, teacher_epochs=1)
    run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "mixed"], root)
    run_bkd(["evaluate", *TINY, "--distill", "mixed"], root)
    return root
