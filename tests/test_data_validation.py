"""Bad dataset files are refused where they enter, in one line naming the file: each test writes
the bad file itself (tiny, in the real format) and loads it the way the stages do."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data import load_split, load_splits
from pipeline.errors import ConfigError, DataError
from tests.helpers import REPO, run_bkd, write_cifar10, write_hdf5, write_imagefolder

RNG = np.random.default_rng(1)


def _data_cfg(name: str, root: Path, *overrides: str):
    return load_config(None, [f"data.name={name}", f"data.root={root}", *overrides]).data


def _refused(fragments: list[str], call, *args) -> str:
    """Assert that call(*args) raises one-line DataError containing every fragment; the message."""
    with pytest.raises(DataError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# CIFAR python batches
# ---------------------------------------------------------------------------------------------


def _cifar_test_batch(root: Path, data, labels) -> Path:
    """A valid CIFAR-10 folder whose test_batch holds `data` and `labels`."""
    write_cifar10(root)
    path = root / "cifar-10-batches-py" / "test_batch"
    # protocol 3: protocol 2 pickles an empty array's buffer through builtins.bytes, which the
    # safe unpickler refuses before the checks under test are reached
    path.write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=3))
    return path


def _pixels(n: int = 4, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return RNG.integers(0, high, (n, 3072)).astype(dtype)


@pytest.mark.parametrize("data, labels, fragments", [
    (RNG.random((4, 3072), dtype=np.float32), [0, 1, 2, 3], ["'data'", "float32", "0..255"]),
    (_pixels(dtype=np.int16, high=300), [0, 1, 2, 3], ["'data'", "0..255", "299"]),
    (_pixels()[:, :1024], [0, 1, 2, 3], ["'data'", "3072", "(4, 1024)"]),
    (_pixels(), [0.0, 1.0, 2.0, 3.0], ["'labels'", "integer", "float64"]),
    (_pixels(), [True, False, True, False], ["'labels'", "integer", "bool"]),
    (_pixels(), [0, 1, 2], ["3 labels", "4 images"]),
    (_pixels(), [[0], [1], [2], [3]], ["'labels'", "1-D", "(4, 1)"]),
    (_pixels(), [0, 1, 255, 3], ["label 255", "row 2", "[0, 10)"]),
    (_pixels(), [0, -1, 2, 3], ["label -1", "row 1", "[0, 10)"]),
    (_pixels(0), [], ["no samples"]),
], ids=["float-images", "ints-above-255", "wrong-width", "float-labels", "bool-labels", "fewer-labels",
        "2d-labels", "label-255", "negative-label", "empty"])
def test_cifar_refuses_bad_batches(tmp_path, data, labels, fragments):
    path = _cifar_test_batch(tmp_path, data, labels)
    _refused([str(path), *fragments], load_split, _data_cfg("cifar10", tmp_path), "test")


def test_cifar_accepts_other_integer_arrays_within_0_255(tmp_path):
    pixels = _pixels(dtype=np.int64)
    _cifar_test_batch(tmp_path, pixels.reshape(4, 3, 32, 32), np.array([0, 9, 2, 3], np.uint8))
    test = load_split(_data_cfg("cifar10", tmp_path), "test")
    assert test.source.images.dtype == np.uint8
    np.testing.assert_array_equal(test.source.images, pixels.reshape(4, 3, 32, 32))
    assert test.labels.tolist() == np.array([0, 9, 2, 3])[test.ids].tolist()  # the split's rows, in its order


# ---------------------------------------------------------------------------------------------
# HDF5 files
# ---------------------------------------------------------------------------------------------


def _h5(path: Path, key: str, data: np.ndarray, labels: np.ndarray, num_classes=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh.create_dataset(key, data=data)
        fh.create_dataset("labels", data=labels)
        if num_classes is not None:
            fh.attrs["num_classes"] = num_classes
    return path


def _images(n: int = 4, shape=(1, 8, 8)) -> np.ndarray:
    return RNG.integers(0, 256, (n, *shape), dtype=np.uint8)


def _frames(n: int = 4, shape=(3, 2, 8, 8), dtype=np.float32) -> np.ndarray:
    return RNG.integers(0, 4, (n, *shape)).astype(dtype)


@pytest.mark.parametrize("name, key, data, labels, num_classes, fragments", [
    ("hdf5", "images", RNG.random((4, 1, 8, 8), dtype=np.float32), [0, 1, 2, 3], 10, ["(N, C, H, W) uint8", "float32"]),
    ("hdf5", "images", _images(4, (8, 8)), [0, 1, 2, 3], 10, ["(N, C, H, W) uint8", "(4, 8, 8)"]),
    ("dvs_hdf5", "frames", _frames(4, (2, 8, 8)), [0, 1, 2, 3], 10, ["(N, T, 2, H, W)", "(4, 2, 8, 8)"]),
    ("dvs_hdf5", "frames", _frames(4, (3, 3, 8, 8)), [0, 1, 2, 3], 10, ["(N, T, 2, H, W)", "(4, 3, 3, 8, 8)"]),
    ("dvs_hdf5", "frames", _frames(dtype=np.complex64), [0, 1, 2, 3], 10, ["real-valued", "complex64"]),
    ("hdf5", "images", _images(), np.array([0.0, 1.0, 2.0, 3.0]), 10, ["'labels'", "integer", "float64"]),
    ("hdf5", "images", _images(), np.array([[0, 1], [2, 3]]), 10, ["'labels'", "1-D", "(2, 2)"]),
    ("hdf5", "images", _images(), [0, 1, 2], 10, ["3 labels", "4 images"]),
    ("hdf5", "images", _images(), [0, 1, 2, 10], 10, ["label 10", "row 3", "[0, 10)"]),
    ("hdf5", "images", _images(), [0, -2, 2, 3], None, ["label -2", "row 1", ">= 0"]),
    ("hdf5", "images", _images(), [0, 1, 2, 3], 2.5, ["num_classes", "positive integer", "2.5"]),
    ("hdf5", "images", _images(0), np.zeros(0, np.int64), 10, ["no samples"]),
    ("hdf5", "images", _images(4, (1, 0, 0)), [0, 1, 2, 3], 10, ["empty sample shape", "(1, 0, 0)"]),
], ids=["float-images", "3d-images", "4d-frames", "3-polarities", "complex-frames", "float-labels",
        "2d-labels", "fewer-labels", "label-above-attribute", "negative-label", "float-attribute", "empty",
        "zero-size-images"])
def test_hdf5_refuses_bad_files_at_open(tmp_path, name, key, data, labels, num_classes, fragments):
    path = _h5(tmp_path / "train.h5", key, data, np.asarray(labels), num_classes)
    _refused([str(path), *fragments], load_split, _data_cfg(name, tmp_path), "train")


def test_hdf5_checks_do_not_read_the_images(tmp_path, monkeypatch):
    _h5(tmp_path / "train.h5", "images", _images(), [0, 1, 2, 3], 10)
    read = h5py.Dataset.__getitem__

    def only_labels(self, key):
        assert self.name == "/labels", f"{self.name} read at open time"
        return read(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", only_labels)
    assert load_split(_data_cfg("hdf5", tmp_path), "train").num_classes == 10


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_dvs_frames_with_negative_or_non_finite_counts_are_refused_when_read(tmp_path, bad):
    frames = _frames(6)
    frames[4, 1, 0, 2, 3] = bad
    path = _h5(tmp_path / "train.h5", "frames", frames, np.arange(6) % 2)
    train = load_split(_data_cfg("dvs_hdf5", tmp_path), "train")
    at = train.ids.tolist().index  # the split's position of a file row
    assert train.load([at(0), at(1), at(2)]).shape == (3, 3, 2, 8, 8)  # rows without the bad value read fine
    _refused([str(path), "'frames'", "rows [4]", "negative or non-finite"], train.load, [at(5), at(4), at(0)])


# ---------------------------------------------------------------------------------------------
# ImageNet-style class folders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, fragment", [
    (lambda root: shutil.rmtree(root / "val" / "n01440764"), "'n01440764' is only in"),
    (lambda root: shutil.copytree(root / "val" / "n01443537", root / "val" / "n09999999"), "'n09999999' is only in"),
], ids=["val-missing-a-class", "val-with-an-extra-class"])
def test_imagefolder_refuses_differing_class_lists(tmp_path, change, fragment):
    write_imagefolder(tmp_path, per_class=2)
    change(tmp_path)
    cfg = _data_cfg("imagenet", tmp_path, "data.image_size=16")
    fragments = [str(tmp_path / "train"), str(tmp_path / "val"), fragment]
    _refused(fragments, load_split, cfg, "test")
    _refused(fragments, load_splits, cfg, ["train", "test"])


def test_imagefolder_test_split_needs_the_train_folder_to_number_its_classes(tmp_path):
    write_imagefolder(tmp_path, per_class=2)
    shutil.rmtree(tmp_path / "train")
    _refused([str(tmp_path / "train"), "not found"], load_split, _data_cfg("imagenet", tmp_path), "test")


def test_imagefolder_refuses_an_empty_class_folder(tmp_path):
    write_imagefolder(tmp_path, per_class=2)
    for image in (tmp_path / "train" / "n01443537").iterdir():
        image.unlink()
    _refused([str(tmp_path / "train" / "n01443537"), "no images"], load_split, _data_cfg("imagenet", tmp_path),
             "train")


def test_imagefolder_refuses_a_tree_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    _refused([str(tmp_path / "train"), "no class folders"], load_split, _data_cfg("imagenet", tmp_path), "train")


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],  # truncated download
    lambda data: b"not a jpeg at all" + data[100:],  # corrupt header
], ids=["truncated", "corrupt"])
def test_imagefolder_refuses_an_unreadable_image_when_read(tmp_path, damage):
    write_imagefolder(tmp_path, per_class=2)
    path = tmp_path / "train" / "n01443537" / "1.JPEG"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(damage(path.read_bytes()))
    train = load_split(_data_cfg("imagenet", tmp_path, "data.image_size=16"), "train")
    file_row = [s[0] for s in train.source.folder.samples].index(str(path))
    row, good = train.ids.tolist().index(file_row), train.ids.tolist().index(0)  # the split's positions
    assert train.load([good]).shape == (1, 3, 16, 16)
    _refused([str(path), "not a readable image"], train.load, [good, row])


# ---------------------------------------------------------------------------------------------
# Train and test of one dataset
# ---------------------------------------------------------------------------------------------


def test_load_splits_refuses_a_sample_shape_mismatch(tmp_path):
    train = _h5(tmp_path / "train.h5", "images", _images(4, (1, 8, 8)), [0, 1, 2, 3], 10)
    test = _h5(tmp_path / "test.h5", "images", _images(4, (3, 8, 8)), [0, 1, 2, 3], 10)
    _refused([str(train), str(test), "(1, 8, 8)", "(3, 8, 8)"], load_splits, _data_cfg("hdf5", tmp_path),
             ["train", "test"])


def test_load_splits_shares_the_class_count_of_files_without_the_attribute(tmp_path):
    _h5(tmp_path / "train.h5", "images", _images(), [0, 1, 2, 3])
    _h5(tmp_path / "test.h5", "images", _images(), [0, 1, 1, 0])  # no sample of classes 2 and 3
    splits = load_splits(_data_cfg("hdf5", tmp_path), ["train", "test"])
    assert splits["train"].num_classes == splits["test"].num_classes == 4
    assert sorted(splits["test"].labels.tolist()) == [0, 0, 1, 1]


def test_load_splits_refuses_disagreeing_class_counts(tmp_path):
    train = _h5(tmp_path / "train.h5", "images", _images(), [0, 1, 2, 3], 10)
    test = _h5(tmp_path / "test.h5", "images", _images(), [0, 1, 2, 3], 5)
    _refused([str(train), str(test), "10 classes", "5"], load_splits, _data_cfg("hdf5", tmp_path), ["train", "test"])


def test_load_splits_holds_an_undeclared_split_to_the_declared_class_count(tmp_path):
    _h5(tmp_path / "train.h5", "images", _images(), [0, 1, 2, 3], 5)
    _h5(tmp_path / "test.h5", "images", _images(), [0, 1, 1, 0])
    splits = load_splits(_data_cfg("hdf5", tmp_path), ["train", "test"])
    assert splits["train"].num_classes == splits["test"].num_classes == 5

    train = tmp_path / "train.h5"
    test = _h5(tmp_path / "test.h5", "images", _images(), [0, 1, 6, 0])
    _refused([str(test), str(train), "label 6", "[0, 5)"], load_splits, _data_cfg("hdf5", tmp_path),
             ["train", "test"])


def test_load_split_alone_still_loads_one_split(tmp_path):
    write_hdf5(tmp_path, "images", (1, 8, 8), {"train": 6, "test": 3})
    cfg = _data_cfg("hdf5", tmp_path)
    assert len(load_split(cfg, "test")) == 3
    assert load_splits(cfg, ["test"])["test"].fingerprint() == load_split(cfg, "test").fingerprint()


# ---------------------------------------------------------------------------------------------
# Empty splits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fragment", [
    (["data.limit=0"], "data.limit"),
    (["data.test_size=5000"], "data.test_size"),
])
def test_a_split_left_empty_by_the_config_is_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_split(load_config(None, overrides).data, "test")


# ---------------------------------------------------------------------------------------------
# Through the CLI
# ---------------------------------------------------------------------------------------------


def test_cli_refuses_a_bad_cifar_batch_in_one_line_before_any_work(tmp_path):
    path = _cifar_test_batch(tmp_path / "data", _pixels(), [0, 1, 255, 3])
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = run_bkd(["extract-teacher", "--config", "configs/cifar10-spikingformer-4-384.yaml",
                      "--set", f"data.root={tmp_path / 'data'}", "--set", "extract.store=store.zarr"],
                     tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bkd: error: ") and str(path) in lines[0], result.stderr
    assert "label 255" in lines[0]
    assert not (tmp_path / "store.zarr").exists()
