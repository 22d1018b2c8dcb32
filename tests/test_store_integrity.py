"""The teacher-target store refuses what it cannot vouch for: foreign files it would delete, missing or
emptied shards, shards that do not match their digests, rows with values no teacher writes, and pixels
other than the ones it was extracted from. Written and read with pipeline.targets directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import StoreError
from pipeline.targets import TeacherTargets, verify_store
from tests.helpers import (CHUNK, N_TRAIN, TOPK, build_store, build_topk_store, make_arrays, make_test_spec,
                           open_writer, run_bkd, write_split)


def test_overwrite_refuses_a_store_holding_foreign_files_and_a_symlink(tmp_path: Path):
    path = tmp_path / "s.zarr"
    build_store(path)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="notes.txt"):
        open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert (path / "notes.txt").read_text() == "mine" and (path / "train").is_dir()
    (path / "notes.txt").unlink()
    link = tmp_path / "link.zarr"
    link.symlink_to(path)
    with pytest.raises(StoreError, match="symbolic link"):
        open_writer(link, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert TeacherTargets(path, "train").manifest["teacher"]["checkpoint_sha256"] == "a" * 64
    # its own store is replaced
    open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert not (path / "notes.txt").exists()


def test_overwrite_refuses_a_user_file_inside_a_split_folder(tmp_path: Path):
    path = tmp_path / "s.zarr"
    build_store(path)
    (path / "train" / "NOTES.txt").write_text("mine")
    with pytest.raises(StoreError, match="train/NOTES.txt"):
        open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert (path / "train" / "NOTES.txt").read_text() == "mine"


def test_a_manifest_naming_paths_outside_the_store_deletes_nothing_there(tmp_path: Path):
    path, victim = tmp_path / "s.zarr", tmp_path / "victim"
    build_store(path)
    victim.mkdir()
    (victim / "data.txt").write_text("precious")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["manifest"]["splits"]["../victim"] = meta["attributes"]["manifest"]["splits"]["test"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="unknown split"):
        TeacherTargets(path, "train")
    open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)  # replaces only its own objects
    assert (victim / "data.txt").read_text() == "precious"


def test_crash_while_writing_the_skeleton_is_recoverable(tmp_path: Path, monkeypatch):
    path = tmp_path / "s.zarr"
    real = zarr.Group.create_array
    calls = []

    def dies_on_the_fourth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        open_writer(path)
    monkeypatch.setattr(zarr.Group, "create_array", real)
    writer = open_writer(path)  # the same command again: the half-made skeleton is recognised and rebuilt
    assert writer.missing_shards("train") == [0, 1, 2]
    # an interrupted --overwrite that removed the split folders but not the root is still bkd's
    build_store(tmp_path / "t.zarr")
    shutil.rmtree(tmp_path / "t.zarr" / "train")
    open_writer(tmp_path / "t.zarr", spec=make_test_spec(sha="d" * 64), overwrite=True)


@pytest.mark.parametrize("array", ["features.pre_logits", "logits", "view_params", "labels", "pixel_digest"])
@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_missing_or_empty_shard_is_an_error(tmp_path: Path, array: str, damage: str):
    path = tmp_path / "s.zarr"
    build_store(path)
    shard_file = path / "train" / array / "c" / "1"
    while shard_file.is_dir():  # c/1/0/0 for (N, V, C) arrays, c/1 for (N,)
        shard_file = next(shard_file.iterdir())
    assert shard_file.stat().st_size > 0
    if damage == "deleted":
        shard_file.unlink()
    else:
        shard_file.write_bytes(b"")
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert "missing or empty" in problems[("train", 1)]
    assert problems[("train", 0)] is None and problems[("train", 2)] is None
    with pytest.raises(StoreError, match="shard 1 is damaged"):
        TeacherTargets(path, "train")  # refused at open, before any training
    targets = TeacherTargets(path, "train", require_complete=False)
    targets.read_rows(0, CHUNK)  # shard 0 is fine
    with pytest.raises(StoreError, match="shard 1"):
        targets.read_rows(2 * CHUNK, 2 * CHUNK + 5)


def test_all_zero_arrays_are_still_written(tmp_path: Path):
    """view_params of augment.kind none are all zeros: each shard must still be an object on disk."""
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    data = make_arrays(N_TRAIN, 0, 3)
    data["view_params"][:] = 0
    data["labels"][:] = 0
    write_split(writer, "train", data)
    write_split(writer, "test", make_arrays(150, 1))
    writer.finish()
    TeacherTargets(path, "train")  # every shard present
    assert all(problem is None for _, _, problem in verify_store(path))


def test_rows_verify_would_flag_are_refused_when_read(tmp_path: Path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    data = make_arrays(N_TRAIN, 0, 3)
    data["features.pre_logits"][200, 1, 0] = np.nan  # shard 1
    write_split(writer, "train", data)
    write_split(writer, "test", make_arrays(150, 1))
    writer.finish()
    targets = TeacherTargets(path, "train")  # present and complete: accepted at open
    targets.read_chunk(0)
    with pytest.raises(StoreError, match="non-finite teacher features"):
        targets.read_chunk(3)  # rows 192:256


def test_swapped_shards_are_caught_by_their_chunk_digests(tmp_path: Path):
    path = tmp_path / "s.zarr"
    build_store(path)
    a, b = path / "train/logits/c/0/0/0", path / "train/logits/c/1/0/0"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert "does not match its digest" in problems[("train", 0)] and "digest" in problems[("train", 1)]
    assert problems[("train", 2)] is None
    with pytest.raises(StoreError, match="digest"):
        TeacherTargets(path, "train").read_chunk(0)


@pytest.mark.parametrize("array", ["logits_index", "logits_target_class", "logits_target", "logits_tail"])
def test_cache_verify_catches_a_damaged_topk_array(tmp_path: Path, array: str):
    path = tmp_path / "s.zarr"
    build_topk_store(path)
    assert run_bkd(["cache", "verify", str(path)], tmp_path).returncode == 0
    stored = zarr.open_array(str(path / "train" / array), mode="r+")
    rows = stored[64:128]  # chunk 1, shard 0: rewritten behind bkd's back, digests untouched
    stored[64:128] = (rows + 1) % 10 if rows.dtype.kind == "i" else rows + 0.5
    proc = run_bkd(["cache", "verify", str(path)], tmp_path, check=False)
    assert proc.returncode == 1 and "bad shard train/0" in proc.stderr and array in proc.stderr, proc.stderr
    assert "train/1" not in proc.stderr and "train/2" not in proc.stderr
    with pytest.raises(StoreError, match=f"chunk 1 of {array} does not match its digest"):
        TeacherTargets(path, "train").read_chunk(1)


def test_topk_rows_that_cannot_be_rebuilt_are_refused(tmp_path: Path):
    from pipeline.targets import topk_arrays
    path = tmp_path / "s.zarr"
    writer = open_writer(path, spec=make_test_spec(logits_topk=TOPK))
    for split, n, views in (("train", N_TRAIN, 3), ("test", 150, 1)):
        data = make_arrays(n, 0, views)
        kept = topk_arrays(data["logits"], TOPK, np.repeat(data["labels"][:, None, None], views, 1).repeat(2, 2))
        if split == "train":
            kept["logits_tail"][200, 1, 0] = np.nan  # shard 1, written with matching digests
            kept["logits_target_class"][10, 0, 1] = 10  # shard 0: a class the teacher does not have
        write_split(writer, split, {**data, **kept})
    writer.finish()
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert "logits_target_class outside [0, 10)" in problems[("train", 0)]
    assert "non-finite logits_tail" in problems[("train", 1)] and problems[("train", 2)] is None
    with pytest.raises(StoreError, match="non-finite logits_tail"):
        TeacherTargets(path, "train").read_chunk(3)


def test_check_pixels_compares_each_sample(tmp_path: Path):
    from pipeline.targets import pixel_digests

    raw = np.random.default_rng(0).integers(0, 256, (N_TRAIN, 1, 4, 4), dtype=np.uint8)
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    data = make_arrays(N_TRAIN, 0, 3)
    data["pixel_digest"] = pixel_digests(raw)
    write_split(writer, "train", data)
    targets = TeacherTargets(path, "train", require_complete=False)
    rows = np.array([0, 5, 299])
    targets.check_pixels(raw[rows], rows)
    other = raw[rows].copy()
    other[1, 0, 0, 0] ^= 1  # one bit of one pixel
    with pytest.raises(StoreError, match="sample 5"):
        targets.check_pixels(other, rows)
    with pytest.raises(StoreError):  # same bytes, another dtype or shape is another input
        targets.check_pixels(raw[rows].reshape(3, 1, 2, 8), rows)
