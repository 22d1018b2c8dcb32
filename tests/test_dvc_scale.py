"""benchmarks.dvc_scale: the before/after DVC layouts measured on a 16 MiB stand-in store (its timings
are not tested: speed and disk at scale live in benchmarks/results-dvc.json), and its extrapolation's fit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.dvc_scale import rates
from tests.helpers import REPO


@pytest.mark.slow
def test_smoke_run_shows_the_store_outside_dvc(tmp_path):
    bin_dir = Path(sys.executable).parent
    if shutil.which("dvc", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        pytest.skip("no dvc next to the interpreter or on PATH")
    out = tmp_path / "dvc.json"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.dvc_scale", "--smoke", "--json", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    before, after = r["before"], r["after"]
    store = before["disk"]["store_du_bytes"]
    assert 15 * 2**20 <= before["disk"]["store_bytes"] <= 17 * 2**20 and before["disk"]["store_files"] >= 200

    # disk after `dvc repro`: copy mode on ext4 keeps two copies; the after layout keeps the one store
    assert before["disk"]["multiple"] >= 1.8
    assert after["disk"]["multiple"] <= 1.1
    assert after["disk"]["dvc_cache_du_bytes"] < 0.05 * store

    # the queued experiment: before checks the whole store out into its temporary workspace, after reads
    # the originating repository's store
    peak_before = before["experiments"]["disk"]["temp_workspaces_du_peak_bytes"]
    peak_after = after["experiments"]["disk"]["temp_workspaces_du_peak_bytes"]
    assert peak_before >= 0.9 * store
    assert peak_after < 0.1 * peak_before
    assert after["experiments"]["store_read_from_origin"]
    assert all("/.dvc/tmp/exps/" in path for path in before["experiments"]["student_store_paths"])
    for layout in (before, after):
        assert layout["experiments"]["all_succeeded"], layout["experiments"]
        assert [e["metrics"]["seed"] for e in layout["experiments"]["found"]] == [1]

    # the extrapolation to the paper row
    paper, x = r["paper_row"], r["extrapolation"]
    assert paper["store_bytes"] > 500 * 2**30 and paper["files"] > 1000 and paper["extraction_s"] > 0
    for key in ("dvc_overhead_s", "per_experiment_s", "disk_multiple", "experiment_disk_peak_bytes"):
        assert set(x[key]) == {"before", "after"}
    assert x["disk_multiple"]["before"] >= 1.8 and x["disk_multiple"]["after"] <= 1.01
    assert x["experiment_temp_workspaces_peak_bytes"]["before"] > 100 * x["experiment_temp_workspaces_peak_bytes"]["after"]
    assert not list((tmp_path / "work").iterdir())  # the repositories are gone


def test_rates_split_per_file_and_per_byte_costs():
    # 2 s fixed, 1 ms per file, 10 s per GiB: a big store of 20k files / 5 GiB, a calibration of 20k files / 80 MiB
    cost = lambda files, size: 2 + 1e-3 * files + 10 * size / 2**30  # noqa: E731
    fit = rates(2.0, cost(20000, 5 * 2**30), 20000, 5 * 2**30, cost(20000, 80 * 2**20), 20000, 80 * 2**20)
    assert fit["per_file"] == pytest.approx(1e-3) and fit["per_byte"] == pytest.approx(10 / 2**30)
    # no calibration: all of the excess per byte; noise below the fixed cost: nothing
    assert rates(2.0, 12.0, 100, 2**30)["per_byte"] == pytest.approx(10 / 2**30)
    assert rates(2.0, 1.5, 100, 2**30) == {"fixed": 2.0, "per_file": 0.0, "per_byte": 0.0}
