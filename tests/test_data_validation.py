"""Bad dataset files are refused where they enter, in one line naming the file: each test writes
the bad file itself (tiny, in the real format) and loads it the way the stages do."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.errors import DataError
from tests.conftest import REPO, run_bkd
from tests.test_datasets import write_cifar10

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
    assert test.labels.tolist() == [0, 9, 2, 3]


# ---------------------------------------------------------------------------------------------
# Through the CLI
# ---------------------------------------------------------------------------------------------


def test_cli_refuses_a_bad_cifar_batch_in_one_line_before_any_work(tmp_path):
    path = _cifar_test_batch(tmp_path / "data", _pixels(), [0, 1, 255, 3])
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = run_bkd(["extract-teacher", "--config", "configs/cifar10-spikformer-4-384.yaml",
                      "--set", f"data.root={tmp_path / 'data'}", "--set", "extract.store=store.zarr"],
                     tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bkd: error: ") and str(path) in lines[0], result.stderr
    assert "label 255" in lines[0]
    assert not (tmp_path / "store.zarr").exists()
