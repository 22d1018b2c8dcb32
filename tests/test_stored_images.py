"""A store holding its images (extract.images) stands in for the dataset: a student trains and is evaluated
from it with the image folder moved away, reads the pixels the teacher saw when a file was rewritten since,
and refuses a store whose images or sample ids were tampered with."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.digests import split_fingerprint
from pipeline.errors import DataError, StoreError
from pipeline.student.splits import student_splits
from pipeline.targets import IMAGES, SOURCE_ROW, verify_store
from pipeline.targets.manifest import chunk_digests
from tests.helpers import (REPO, extract_recording, imagenet_config, rewrite_manifest, run_bkd, write_cifar10,
                           write_photos)


@pytest.fixture(scope="module")
def photo_store(tmp_path_factory) -> Path:
    """A folder with a JPEG tree (photos/), a random teacher and a K = 3 store of both splits with the images."""
    root = tmp_path_factory.mktemp("stored-images")
    write_photos(root / "photos")
    extract_recording(imagenet_config(root))
    return root


def _copy(photo_store: Path, tmp_path: Path) -> Path:
    shutil.copytree(photo_store, tmp_path / "p")
    return tmp_path / "p"


def _args(root: Path, *extra: str) -> list[str]:
    sets = ["data.name=imagenet", f"data.root={root / 'photos'}", "data.image_size=16", "data.load_size=24",
            "augment.kind=resized_crop_flip", "augment.flip=true", "extract.views=3", "extract.images=true",
            "extract.chunk_size=4", "extract.chunks_per_shard=2", "extract.features=[pre_logits]",
            "student.model_kwargs.widths=[8,16,32]", "student.batch_size=4", "student.epochs=2", "loader.workers=0",
            f"teacher.checkpoint={root / 'teacher.safetensors'}", f"extract.store={root / 'imagenet.zarr'}", *extra]
    return ["--config", str(REPO / "params.yaml"), *(x for s in sets for x in ("--set", s))]


def _train(root: Path, run: str):
    return run_bkd(["train-student", *_args(root), "--run-dir", str(root / run)], root)


def _evaluate(root: Path, run: str) -> dict:
    run_bkd(["evaluate", *_args(root), "--run-dir", str(root / run), "--metrics", str(root / f"{run}.json"),
             "--plots-dir", str(root / f"{run}-plots")], root)
    return json.loads((root / f"{run}.json").read_text())


def _weights(root: Path, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / run / "student.safetensors"))


def test_a_store_with_its_images_trains_and_evaluates_with_the_image_folder_moved_away(photo_store, tmp_path):
    root = _copy(photo_store, tmp_path)
    present = _train(root, "present")
    assert "pixels: the images stored in" in present.stdout + present.stderr  # which pixels the run reads
    with_folder = _evaluate(root, "present")
    (root / "photos").rename(root / "photos.away")  # a node that holds the store and not the image folder
    away = _train(root, "away")
    said = away.stdout + away.stderr
    assert "reading the images stored in" in said and "not found" in said
    for name, tensor in _weights(root, "present").items():  # the very run: same pixels, ids, labels, order
        assert torch.equal(tensor, _weights(root, "away")[name]), name
    without_folder = _evaluate(root, "away")
    keys = ("top1", "top5", "teacher_top1", "firing_rate")
    assert {k: without_folder[k] for k in keys} == {k: with_folder[k] for k in keys}
    assert _evaluate(root, "present")["top1"] == with_folder["top1"]


def test_a_rewritten_image_file_is_reported_and_the_run_reads_the_pixels_the_teacher_saw(photo_store, tmp_path):
    root = _copy(photo_store, tmp_path)
    _train(root, "clean")
    path = sorted((root / "photos" / "train" / "n01440764").iterdir())[2]
    pixels = np.asarray(Image.open(path))
    Image.fromarray(255 - pixels).save(path, quality=90)  # another valid JPEG under the same name
    out = _train(root, "rewritten")
    said = out.stdout + out.stderr
    assert "warning: 1 of 12 checked train samples" in said and "the run reads the stored ones" in said
    for name, tensor in _weights(root, "clean").items():
        assert torch.equal(tensor, _weights(root, "rewritten")[name]), name


@pytest.mark.parametrize("folder", ["present", "away"])
def test_a_tampered_stored_test_image_is_refused_in_evaluation(photo_store, tmp_path, folder):
    root = _copy(photo_store, tmp_path)
    images = zarr.open_group(str(root / "imagenet.zarr"), mode="r+")["test"][IMAGES]
    images[1] = images[2]  # another real picture in row 1, read by evaluation, never by the files' check
    if folder == "away":
        (root / "photos").rename(root / "photos.away")
    with pytest.raises(StoreError, match=r"stored image of sample \d+ \(store row 1\) does not match") as info:
        splits, _ = student_splits(imagenet_config(root))  # without the files: refused at the split's check
        splits["test"].load(range(len(splits["test"])))  # with them: at the first read
    assert "\n" not in str(info.value)


def _without_sample_ids(root: Path) -> None:
    """Make the store one written before sample ids were stored (format 9): the same, less source_row."""
    import pipeline.teacher.extract as extract

    real = extract.expected_spec

    def spec_of_format_9(*args, **kwargs):
        spec = real(*args, **kwargs)
        return dataclasses.replace(spec, features={k: v for k, v in spec.features.items() if k != "source_rows"})

    shutil.rmtree(root / "imagenet.zarr")
    extract.expected_spec = spec_of_format_9
    try:
        extract_recording(imagenet_config(root))
    finally:
        extract.expected_spec = real
    rewrite_manifest(root / "imagenet.zarr", lambda m: m.update(format="bkd-teacher-targets/9"))


def test_a_store_without_sample_ids_needs_the_files_and_says_so(photo_store, tmp_path):
    root = _copy(photo_store, tmp_path)
    _without_sample_ids(root)
    assert SOURCE_ROW not in zarr.open_group(str(root / "imagenet.zarr"), mode="r")["train"]
    cfg = imagenet_config(root)
    splits, _ = student_splits(cfg)  # with the files: their ids, the store's pixels
    assert len(splits["train"].load(range(3))) == 3
    (root / "photos").rename(root / "photos.away")
    with pytest.raises(StoreError, match="does not hold its samples' ids .*format 9.*put them back") as info:
        student_splits(cfg)
    assert "\n" not in str(info.value)


def test_a_store_without_images_needs_the_files_and_says_they_are_missing(photo_store, tmp_path):
    root = _copy(photo_store, tmp_path)
    plain = imagenet_config(root, "extract.images=false", f"extract.store={root / 'plain.zarr'}")
    extract_recording(plain)
    (root / "photos").rename(root / "photos.away")
    for cfg in (plain, imagenet_config(root, f"extract.store={root / 'none.zarr'}")):
        with pytest.raises(DataError, match="not found") as info:
            student_splits(cfg)
        assert "\n" not in str(info.value)
    refused = run_bkd(["train-student", *_args(root, f"extract.store={root / 'plain.zarr'}", "extract.images=false"),
                       "--run-dir", str(root / "r")], root, check=False)
    assert refused.returncode == 2 and refused.stderr.count("bkd: error:") == 1 and "not found" in refused.stderr


def test_sample_ids_swapped_behind_the_digests_are_refused_without_the_files(photo_store, tmp_path):
    """Two rows' ids exchanged and the chunk digest rewritten to match: the split's fingerprint catches it."""
    root = _copy(photo_store, tmp_path)
    store = root / "imagenet.zarr"
    assert not any(p for _, _, p in verify_store(store))
    ids = zarr.open_group(str(store), mode="r")["train"][SOURCE_ROW][:]
    ids[[0, 1]] = ids[[1, 0]]
    _forge(store, "train", SOURCE_ROW, ids)
    problems = [(split, shard, p) for split, shard, p in verify_store(store) if p]
    assert problems == [("train", None, "the sample ids and labels are not the ones the manifest's fingerprint "
                                        "records")]
    (root / "photos").rename(root / "photos.away")
    with pytest.raises(StoreError, match="damaged store, train: the sample ids and labels are not"):
        student_splits(imagenet_config(root))


def _forge(store: Path, split: str, name: str, values: np.ndarray) -> None:
    """Write `values` into the split's array `name` and its chunk digests to match, as a forger would."""
    from pipeline.targets import TeacherTargets

    group = zarr.open_group(str(store), mode="r+")[split]
    group[name][:] = values
    targets = TeacherTargets(store, split, require_complete=False)
    column = targets.spec.row_arrays().index(name)
    digests = group["chunk_digest"][:]
    digests[:, column] = chunk_digests({name: values}, (name,), 0, targets.chunk_size)[:, 0]
    group["chunk_digest"][:] = digests


def test_verify_checks_every_stored_image_against_its_pixel_digest(photo_store, tmp_path):
    root = _copy(photo_store, tmp_path)
    store = root / "imagenet.zarr"
    digests = zarr.open_group(str(store), mode="r")["train"]["pixel_digest"][:]
    digests[3] ^= np.uint64(1)
    _forge(store, "train", "pixel_digest", digests)  # the chunk digests agree; the image does not
    problems = [(split, shard, p) for split, shard, p in verify_store(store) if p]
    assert problems == [("train", 0, "the stored image of row 3 does not match its pixel digest")]


def test_stored_labels_that_are_not_the_files_are_refused_with_the_files_present(photo_store, tmp_path):
    root = _copy(photo_store, tmp_path)
    store = root / "imagenet.zarr"
    labels = zarr.open_group(str(store), mode="r")["train"]["labels"][:]
    labels[0] = 1 - labels[0]
    _forge(store, "train", "labels", labels)
    with pytest.raises(StoreError, match="damaged store, train: the sample ids and labels are not") as info:
        student_splits(imagenet_config(root))
    assert "\\n" not in str(info.value)


def test_sample_ids_are_looked_up_without_an_array_as_long_as_the_largest(photo_store, tmp_path):
    """A store's ids are names: one far beyond any dataset (with every digest made to agree) costs no memory."""
    root = _copy(photo_store, tmp_path)
    store = root / "imagenet.zarr"
    group = zarr.open_group(str(store), mode="r")["train"]
    ids, labels = group[SOURCE_ROW][:], group["labels"][:]
    ids[0] = 2 ** 40
    _forge(store, "train", SOURCE_ROW, ids)
    rewrite_manifest(store, lambda m: m["splits"]["train"].update(fingerprint=split_fingerprint(ids, labels)))
    (root / "photos").rename(root / "photos.away")
    cfg = imagenet_config(root)
    splits, _ = student_splits(cfg)
    assert splits["train"].ids[0] == 2 ** 40 and len(splits["train"].load(range(12))) == 12


def test_a_folder_that_cannot_be_listed_is_read_from_the_store(photo_store, tmp_path, monkeypatch):
    import pipeline.student.splits as splits_module

    root = _copy(photo_store, tmp_path)
    denied = root / "photos" / "train"

    def unlistable(*_):
        raise PermissionError(13, "Permission denied", str(denied))

    monkeypatch.setattr(splits_module, "load_splits", unlistable)
    notes = []
    monkeypatch.setattr(splits_module.tqdm, "write", notes.append)
    splits, _ = student_splits(imagenet_config(root), log=True)
    assert len(splits["train"]) == 12
    assert notes == [f"data: Permission denied: {denied}; reading the images stored in {root / 'imagenet.zarr'} "
                     "instead (sample ids and labels checked against its fingerprints)"]


def test_an_in_memory_dataset_rewritten_since_extraction_is_evaluated_on_the_stored_pixels(tmp_path):
    """CIFAR is held in memory: with a test batch rewritten, evaluation still reads the pixels the teacher saw."""
    import pickle

    write_cifar10(tmp_path / "data")
    sets = ["data.name=cifar10", f"data.root={tmp_path / 'data'}", "extract.images=true", "extract.chunk_size=8",
            "extract.chunks_per_shard=2", "extract.features=[pre_logits]", "student.model_kwargs.widths=[8,16,32]",
            "student.batch_size=8", "student.epochs=1", "loader.workers=0", f"extract.store={tmp_path / 'c.zarr'}",
            f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}"]
    args = ["--config", str(REPO / "params.yaml"), *(x for s in sets for x in ("--set", s))]
    extract_recording(load_config(REPO / "params.yaml", sets))
    run_bkd(["train-student", *args, "--run-dir", str(tmp_path / "run")], tmp_path)

    def evaluate(name):
        out = run_bkd(["evaluate", *args, "--run-dir", str(tmp_path / "run"), "--metrics", str(tmp_path / name),
                       "--plots-dir", str(tmp_path / "plots")], tmp_path)
        return json.loads((tmp_path / name).read_text()), out.stdout + out.stderr

    clean, _ = evaluate("clean.json")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    data = pickle.loads(batch.read_bytes())
    data["data"][:] = 0
    batch.write_bytes(pickle.dumps(data, protocol=2))
    rewritten, said = evaluate("rewritten.json")
    assert "warning: 8 of 8 checked test samples" in said
    keys = ("top1", "teacher_top1", "firing_rate", "sops_per_sample")
    assert {k: rewritten[k] for k in keys} == {k: clean[k] for k in keys}
