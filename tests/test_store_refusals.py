"""The commands given a store that is not theirs, damaged, or built from other pixels: one
`bkd: error:` line, and nothing deleted or trained on. End to end on the tiny project."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest

from tests.helpers import REPO, TINY, assert_refused, run_bkd, write_hdf5

pytestmark = pytest.mark.slow

STORE = "cache/mnist5k-resnet18.zarr"


def test_overwrite_refuses_a_folder_bkd_did_not_make(tiny_project: Path, tmp_path: Path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    proc = run_bkd(["extract-teacher", *TINY, "--store", str(thesis), "--overwrite"], tiny_project, check=False)
    assert_refused(proc, "not a bkd teacher-target store")
    assert (thesis / "chapter1.tex").read_text() == "years of work"


@pytest.mark.parametrize("store", ["", " ", ".", ".."])
def test_overwrite_never_deletes_the_working_folder(tiny_project: Path, tmp_path: Path, store: str):
    work = tmp_path / "repo"
    shutil.copytree(tiny_project / "configs", work / "configs")
    shutil.copy(tiny_project / "params.yaml", work / "params.yaml")
    (work / ".git").mkdir()
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    shutil.copytree(tiny_project / "models", work / "models")
    proc = run_bkd(["extract-teacher", *TINY, "--store", store, "--overwrite"], work, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("bkd: error:")
    assert (work / ".git" / "HEAD").is_file() and (work / "configs").is_dir()


def test_train_student_refuses_a_store_with_a_deleted_shard(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    shutil.rmtree(store / "train" / "features.pre_logits" / "c" / "1")
    proc = run_bkd(["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"],
                   tiny_project, check=False)
    assert_refused(proc, "train shard 1 is damaged")
    assert not (tiny_project / "runs/refused").exists()
    verify = run_bkd(["cache", "verify", str(store)], tiny_project, check=False)
    assert verify.returncode == 1 and "bad shard train/1" in verify.stderr


def test_damaged_manifest_is_one_line(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["manifest"]["splits"]
    (store / "zarr.json").write_text(json.dumps(meta))
    for args in (["cache", "info", str(store)], ["cache", "verify", str(store)],
                 ["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"]):
        assert_refused(run_bkd(args, tiny_project, check=False), "'splits' is missing")


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: (s / "train/features.pre_logits/zarr.json").unlink(), "train/features.pre_logits is missing"),
    (lambda s: (s / "train/zarr.json").unlink(), "'train' group's metadata is missing"),
    (lambda s: (s / "train/shards_done/c/1").write_bytes(b"\x00\x01"), "shards_done cannot be read"),
    (lambda s: _edit_manifest(s, ["splits", "train", "num_samples"], "160"), "splits.train.num_samples"),
    (lambda s: _edit_manifest(s, ["chunking", "chunk_size"], 0), "chunking.chunk_size"),
])
def test_damaged_store_metadata_is_one_line(tiny_project: Path, tmp_path: Path, damage, fragment):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    damage(store)
    verify = run_bkd(["cache", "verify", str(store)], tiny_project, check=False)
    if verify.returncode == 1:  # what verify can open and report: the split it cannot read, named
        assert "bad split train: damaged store, " in verify.stderr and fragment in verify.stderr
    else:
        assert_refused(verify, fragment)
    for args in (["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"],
                 ["extract-teacher", *TINY, "--store", str(store)]):
        assert_refused(run_bkd(args, tiny_project, check=False), fragment)


def _edit_manifest(store: Path, keys: list[str], value) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    node = meta["attributes"]["manifest"]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    (store / "zarr.json").write_text(json.dumps(meta))


def test_store_of_other_pixels_with_the_same_ids_is_refused(tmp_path: Path):
    data = tmp_path / "data"
    write_hdf5(data, "images", (1, 8, 8), {"train": 24, "test": 12})
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    args = [*TINY, "--set", "data.name=hdf5", "--set", f"data.root={data}", "--set", "extract.chunk_size=8",
            "--set", "teacher.epochs=1", "--set", "student.epochs=1",
            "--set", "extract.store=cache/h5.zarr"]
    run_bkd(["train-teacher", *args], tmp_path)
    run_bkd(["extract-teacher", *args], tmp_path)
    with h5py.File(data / "train.h5", "r+") as fh:  # same ids, same labels, other pixels in one sample
        images = fh["images"][:]
        images[13] = 255 - images[13]
        fh["images"][...] = images
    proc = run_bkd(["train-student", *args, "--run-dir", "runs/s"], tmp_path, check=False)
    assert_refused(proc, "built from other inputs: train sample 13 (store row ")  # the file's row


@pytest.mark.parametrize("field, value", [
    (["teacher", "checkpoint_sha256"], "0" * 64),  # another teacher's targets, as far as a reader could tell
    (["splits", "train", "fingerprint"], "f" * 16),
    (["splits", "train", "views"], 2),
])
def test_a_hand_edited_manifest_is_refused_by_verify_and_training(tiny_project: Path, tmp_path: Path, field, value):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    _edit_manifest(store, field, value)  # in the metadata object, its digest left as it was written
    for args in (["cache", "verify", str(store)], ["cache", "info", str(store)],
                 ["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"]):
        assert_refused(run_bkd(args, tiny_project, check=False), "does not match the digest written with it")
