"""Extraction on a dask LocalCluster, resume after SIGKILL, and the lock against concurrent runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.targets import verify_store
from pipeline.teacher.extract import store_lock
from tests.helpers import TINY, assert_one_line, run_bkd

pytestmark = pytest.mark.slow

# 160 samples in shards of 16 rows, 4 views: enough shards to kill a run part-way.
SMALL_SHARDS = [*TINY, "--set", "extract.chunk_size=16", "--set", "extract.chunks_per_shard=1",
                "--set", "extract.views=4", "--set", "extract.splits=[train]"]


def _arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")["train"]
    return {name: group[name][:] for name in ("features.pre_logits", "logits", "view_params", "labels", "index")}


@pytest.fixture(scope="module")
def reference(tiny_project) -> Path:
    """The single-process store every other run must reproduce."""
    run_bkd(["extract-teacher", *SMALL_SHARDS, "--store", "cache/reference.zarr"], tiny_project)
    return tiny_project / "cache/reference.zarr"


def test_two_worker_local_cluster_equals_single_process(tiny_project, reference):
    environ = dict(os.environ)
    out = run_bkd(["extract-teacher", *SMALL_SHARDS, "--store", "cache/dask.zarr", "--workers", "2"], tiny_project)
    assert "10 shards written" in out.stdout
    # distributed's nanny sets OMP_NUM_THREADS=1 and more in the launching process; left there, every later
    # subprocess of the caller would train on one thread (and to other numbers than the caller itself)
    assert dict(os.environ) == environ
    ours, theirs = _arrays(tiny_project / "cache/dask.zarr"), _arrays(reference)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert not (tiny_project / "cache/dask.zarr.lock").exists()


def test_sigkill_then_rerun_computes_only_missing_shards(tiny_project, reference):
    store = tiny_project / "cache/killed.zarr"
    bkd = str(Path(sys.executable).with_name("bkd"))
    proc = subprocess.Popen([bkd, "extract-teacher", *SMALL_SHARDS, "--store", str(store)], cwd=tiny_project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = int(zarr.open_group(str(store), mode="r")["train/shards_done"][:].sum())
        except Exception:  # not created yet
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= done < 10, f"the run should have been killed part-way, {done} shards were done"
    info = json.loads(run_bkd(["cache", "info", str(store), "--json"], tiny_project).stdout)
    assert info["complete"] is False
    killed_done = info["splits"]["train"]["shards_complete"]

    # The dead process's lock is stale (its pid is gone): the re-run takes it over.
    out = run_bkd(["extract-teacher", *SMALL_SHARDS, "--store", str(store)], tiny_project)
    assert f"({10 - killed_done} shards written)" in out.stdout
    ours, theirs = _arrays(store), _arrays(reference)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert run_bkd(["cache", "verify", str(store)], tiny_project).returncode == 0


def test_second_concurrent_extraction_is_refused(tiny_project, reference):
    store = tiny_project / "cache/busy.zarr"
    with store_lock(str(store)):  # an extraction by a live process (this one) holds the store
        out = run_bkd(["extract-teacher", *SMALL_SHARDS, "--store", str(store)], tiny_project, check=False)
    assert out.returncode == 2
    assert "being written by another extraction" in out.stderr and str(os.getpid()) in out.stderr
    assert not store.exists()  # refused before anything was written


def test_store_at_an_fsspec_url_equals_the_local_store(tiny_project, reference):
    """The store location is any fsspec URL zarr accepts; memory:// stands in for an object store."""
    url = "memory://bkd-test/targets.zarr"
    out = run_bkd(["extract-teacher", *SMALL_SHARDS, "--store", url], tiny_project)
    assert "10 shards written" in out.stdout
    group = zarr.open_group(url, mode="r")["train"]
    theirs = _arrays(reference)
    for name in theirs:
        np.testing.assert_array_equal(group[name][:], theirs[name], err_msg=name)
    info = json.loads(run_bkd(["cache", "info", url, "--json"], tiny_project).stdout)
    assert info["complete"] is True and info["bytes_on_disk"] > 0
    assert run_bkd(["cache", "verify", url], tiny_project).returncode == 0
    with store_lock(url):  # the lock works through fsspec too
        out = run_bkd(["extract-teacher", *SMALL_SHARDS, "--store", url], tiny_project, check=False)
    assert out.returncode == 2 and "being written by another extraction" in out.stderr
    # the student streams from it like from a local store
    run_bkd(["train-student", *SMALL_SHARDS, "--set", f"extract.store={url}", "--epochs", "1",
             "--run-dir", "runs/from-memory"], tiny_project)
    assert (tiny_project / "runs/from-memory/student.safetensors").is_file()


# Killed at random moments, or missing a shard, a re-run converges to the same arrays.

STORE = "cache/mnist5k-resnet18.zarr"
SHARDED = [*TINY, "--set", "extract.chunk_size=16", "--set", "extract.chunks_per_shard=1", "--set",
           "extract.views=2", "--set", "extract.splits=[train]"]


def test_extraction_killed_at_random_points_converges_to_the_same_store(tiny_project: Path, tmp_path: Path):
    reference, store = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    run_bkd(["extract-teacher", *SHARDED, "--store", str(reference)], tiny_project)
    bkd = str(Path(sys.executable).with_name("bkd"))
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    delays = []
    for _ in range(3):
        proc = subprocess.Popen([bkd, "extract-teacher", *SHARDED, "--store", str(store)], cwd=tiny_project,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delays.append(float(rng.uniform(1.0, 8.0)))  # start-up, skeleton and shards all fall in this range
        try:
            proc.wait(timeout=delays[-1])
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    run_bkd(["extract-teacher", *SHARDED, "--store", str(store)], tiny_project)
    ours = zarr.open_group(str(store), mode="r")["train"]
    theirs = zarr.open_group(str(reference), mode="r")["train"]
    for name in ("features.pre_logits", "logits", "view_params", "labels", "index", "pixel_digest"):
        np.testing.assert_array_equal(ours[name][:], theirs[name][:], err_msg=f"{name} (kill delays {delays})")
    assert all(problem is None for _, _, problem in verify_store(store))


def test_extraction_rerun_rewrites_a_deleted_shard(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    before = zarr.open_group(str(store), mode="r")["train/features.pre_logits"][:]
    (store / "train/features.pre_logits/c/1/0/0").unlink()
    out = run_bkd(["extract-teacher", *TINY, "--store", str(store)], tiny_project)
    assert "(1 shards written)" in out.stdout
    assert all(problem is None for _, _, problem in verify_store(store))
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["train/features.pre_logits"][:], before)


def test_plan_writes_nothing_and_projects_the_written_store_within_ten_percent(tiny_project):
    store = tiny_project / "cache/planned.zarr"
    args = [*TINY, "--set", "extract.views=3", "--set", "extract.features=[pre_logits,layer1,layer2]",
            "--set", "extract.codecs={layer1: uint8, layer2: float16-shuffle}", "--store", "cache/planned.zarr"]
    out = run_bkd(["extract-teacher", *args, "--plan", "--json"], tiny_project)
    plan = json.loads(out.stdout)
    assert not store.exists()
    test_rows = plan["samples"]["test"]
    assert plan["samples"]["train"] == 160 and plan["views"] == {"train": 3, "test": 1}
    assert plan["forward_passes"] == 160 * 3 + test_rows and plan["seconds"] > 0 and plan["free_bytes"] > 0
    rows = {(a["split"], a["name"]): a for a in plan["arrays"]}
    assert rows[("train", "features.layer1")]["codec"] == "uint8" and rows[("train", "scales.layer1")]
    assert rows[("train", "features.layer2")]["codec"] == "float16-shuffle"

    run_bkd(["extract-teacher", *args], tiny_project)
    written = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert abs(plan["total_bytes"] - written) <= 0.1 * written, (plan["total_bytes"], written)
    for (split, name), row in rows.items():  # array by array, too
        folder = store / split / name
        on_disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")
        assert abs(row["bytes"] - on_disk) <= 0.1 * on_disk + 64, (split, name, row["bytes"], on_disk)

    text = run_bkd(["extract-teacher", *args, "--plan", "--samples", "train=1281167", "--calibration-rows", "16"],
                   tiny_project).stdout
    assert "train: 1,281,167 samples x 3 views" in text and "calibrated on 16 train rows" in text
    assert f"teacher forward passes: {1281167 * 3 + test_rows:,}" in text


def test_an_extraction_that_cannot_fit_is_refused_before_the_first_shard(tiny_project, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    out = run_bkd(["extract-teacher", *TINY, "--store", "cache/full.zarr"], tiny_project, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "projected at" in out.stderr and "48.8 KiB free" in out.stderr and "--ignore-free-space" in out.stderr
    assert not (tiny_project / "cache/full.zarr" / "train" / "logits" / "c").exists()  # no shard written
    done = run_bkd(["extract-teacher", *TINY, "--store", "cache/full.zarr", "--ignore-free-space"], tiny_project)
    assert "complete" in done.stdout


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder this process cannot write: mode 0555, or for root (whom modes do not stop) a read-only tmpfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root here cannot mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_plan_says_a_read_only_destination_is_read_only(tiny_project, read_only_folder):
    args = [*TINY, "--store", str(read_only_folder / "s.zarr"), "--plan", "--calibration-rows", "16"]
    text = run_bkd(["extract-teacher", *args], tiny_project).stdout
    assert "READ-ONLY: this process cannot write there" in text
    assert json.loads(run_bkd(["extract-teacher", *args, "--json"], tiny_project).stdout)["writable"] is False
    writable = run_bkd(["extract-teacher", *TINY, "--store", "cache/plan-rw.zarr", "--plan", "--calibration-rows",
                        "16"], tiny_project).stdout
    assert "READ-ONLY" not in writable


def test_a_disk_that_fills_under_ignore_free_space_names_the_store(tiny_project, monkeypatch):
    """A full disk under Zarr's writes raises an OSError naming no file: the one line names the store."""
    import errno

    from zarr.storage import LocalStore

    real_set, writes = LocalStore.set, []

    async def filling_set(self, key, value):
        writes.append(key)
        if len(writes) > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", filling_set)
    out = run_bkd(["extract-teacher", *TINY, "--store", "cache/filling.zarr", "--ignore-free-space"], tiny_project,
                  check=False)
    assert_one_line(out.returncode, out.stderr.splitlines()[-1] + "\n",
                    "No space left on device: cache/filling.zarr")


def test_uint8_on_a_signed_location_is_refused_at_the_first_forward(tiny_project):
    out = run_bkd(["extract-teacher", *TINY, "--set", "extract.features=[pre_logits,layer1.0.bn1]",
                   "--set", "extract.codecs={layer1.0.bn1: uint8}", "--store", "cache/signed.zarr"],
                  tiny_project, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "extract.codecs.layer1.0.bn1 is uint8" in out.stderr and "int8 or float8" in out.stderr
    assert not (tiny_project / "cache/signed.zarr").exists()
