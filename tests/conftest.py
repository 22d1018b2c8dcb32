"""Fixtures shared by the test modules; the helpers they use live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, project_with_store, run_bkd


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A working directory where the whole CLI pipeline ran once on the tiny subset."""
    root = project_with_store(tmp_path_factory, "project", TINY, teacher_epochs=1)
    run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "mixed"], root)
    run_bkd(["evaluate", *TINY, "--distill", "mixed"], root)
    return root
