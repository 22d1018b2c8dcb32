"""Datasets read from their real on-disk formats (tiny files the tests write), and each config
family end to end through the CLI: train-teacher -> extract-teacher -> train-student -> evaluate."""

from __future__ import annotations

import json
import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.errors import DataError
from tests.helpers import REPO, run_bkd, write_cifar10, write_cifar100, write_hdf5, write_imagefolder

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def test_cifar10_reads_the_python_batches(tmp_path):
    batches = write_cifar10(tmp_path)
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path}"]).data
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) == 40 and len(test) == 8 and train.image_shape == (3, 32, 32)
    raw = batches["data_batch_2"]["data"][3].reshape(3, 32, 32)
    expected = (torch.from_numpy(raw).float() / 255 - train.mean) / train.std
    at = train.ids.tolist().index(11)  # file row 11 = batch 2, image 3, at a seeded place in the split
    torch.testing.assert_close(train.load([at])[0], expected)
    assert train.labels[at].item() == batches["data_batch_2"]["labels"][3]


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path}"]).data
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_split(cfg, "test")


@pytest.mark.parametrize("payload, fragment", [
    (b"\x80\x09" + pickle.dumps({"data": [], "labels": []})[2:], "ValueError: unsupported pickle protocol"),
    (b"\x80\x02}q\x00(X\x04\x00\x00\x00data", "not a CIFAR python batch"),  # cut short
    (bytes(range(256)) * 4, "not a CIFAR python batch"),  # not a pickle at all
])
def test_a_cifar_batch_that_does_not_unpickle_is_one_line(tmp_path, payload, fragment):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path}"]).data
    with pytest.raises(DataError) as caught:  # a BkdError: one `bkd: error:` line at the command line
        load_split(cfg, "test")
    message = str(caught.value)
    assert "\n" not in message and "test_batch: " in message and fragment in message


@pytest.mark.parametrize("name, fragment", [
    ("cifar10", "cifar-10-batches-py not found"),
    ("cifar100", "cifar-100-python not found"),
    ("imagenet", "train/<class>"),
    ("hdf5", "train.h5 not found"),
    ("dvs_hdf5", "'frames'"),
])
def test_missing_files_name_what_goes_where(tmp_path, name, fragment):
    cfg = load_config(None, [f"data.name={name}", f"data.root={tmp_path / 'nothing'}"]).data
    with pytest.raises(DataError, match=fragment) as info:
        load_split(cfg, "train")
    assert "\n" not in str(info.value)


def test_imagefolder_resizes_and_crops(tmp_path):
    write_imagefolder(tmp_path)
    cfg = load_config(None, ["data.name=imagenet", f"data.root={tmp_path}", "data.image_size=24"]).data
    train = load_split(cfg, "train")
    assert len(train) == 12 and train.num_classes == 2 and train.image_shape == (3, 24, 24)
    images = train.load([0, 7, 11])
    assert images.shape == (3, 3, 24, 24) and torch.isfinite(images).all()
    assert train.labels.tolist() == [0 if row < 6 else 1 for row in train.ids]  # the files' rows, shuffled
    assert train.ids.tolist() != list(range(12)) and sorted(train.ids.tolist()) == list(range(12))


def test_hdf5_is_read_lazily_in_any_order(tmp_path):
    write_hdf5(tmp_path, "images", (1, 8, 8), {"train": 20, "test": 10})
    cfg = load_config(None, ["data.name=hdf5", f"data.root={tmp_path}"]).data
    train = load_split(cfg, "train")
    assert train._raw is None  # not loaded into memory
    with h5py.File(tmp_path / "train.h5") as fh:
        raw = fh["images"][:]
    rows = [7, 2, 7, 19]
    expected = (torch.from_numpy(raw[train.ids[rows]]).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(train.load(rows), expected)


@pytest.mark.parametrize("layout", [{}, {"chunks": (1, 1, 8, 8)}, {"chunks": (4, 1, 8, 8), "compression": "gzip"}],
                         ids=["contiguous", "row-chunks", "gzip-4-row-chunks"])
@pytest.mark.parametrize("rows", [[7, 2, 7, 19], [3, 4, 5, 6], [19], [0, 19, 10, 11, 1]])
def test_hdf5_reads_any_rows_of_any_layout(tmp_path, layout, rows):
    """Scattered rows (what the shuffled splits ask for), runs, repeats: the values numpy gives."""
    from pipeline.sources import HDF5Source

    data = RNG.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    with h5py.File(tmp_path / "train.h5", "w") as fh:
        fh.create_dataset("images", data=data, **layout)
        fh.create_dataset("labels", data=np.arange(20) % 3)
    np.testing.assert_array_equal(HDF5Source(tmp_path / "train.h5").read(np.asarray(rows)), data[rows])


# ---------------------------------------------------------------------------------------------
# Each config family through the CLI, on tiny real-format data and scaled-down models
# ---------------------------------------------------------------------------------------------

TINY_CML = "student.model_kwargs={depths: 1, embed_dims: 32, num_heads: 2, mlp_ratio: 4.0}"
# the published recipe's shape at toy length: warmup, cooldown, mixed views switched off after epoch 1
TINY_RECIPE = ["augment.mix_views=1", "augment.mix_off_epoch=1", "student.epochs=2",
               "student.schedule.warmup_epochs=1", "student.schedule.cooldown_epochs=1"]
TINY_DVS = "{channels: [4, 4, 4, 4, 8, 8, 8]}"
# Each paper-row config with its published structure (student architecture, neurons, feature
# locations, loss form) at toy widths, and the extra distillation mode to run besides its own.
FAMILIES = {
    "cifar10-spikingformer-4-384.yaml": (
        write_cifar10, ["teacher.model=vit_tiny_patch16_224", TINY_CML, *TINY_RECIPE], "kdsnn"),
    "cifar100-spikingformer-4-384.yaml": (
        write_cifar100, ["teacher.model=vit_tiny_patch16_224", TINY_CML, *TINY_RECIPE], None),
    "imagenet-sew-resnet18.yaml": (  # loader workers, lanes and the stored images, as configured
        write_imagefolder, ["data.image_size=32", "data.load_size=40", "extract.logits_topk=1", "loader.workers=2",
                            "extract.features=[pre_logits, layer1, layer2, layer3, layer4]"], "lasnn"),
    "imagenet-sew-resnet34.yaml": (write_imagefolder, ["data.image_size=32", "data.load_size=40",
                                                       "extract.logits_topk=1"], None),
    "imagenet-sew-resnet50.yaml": (write_imagefolder, ["data.image_size=32", "data.load_size=40",
                                                       "extract.logits_topk=1"], "kdsnn"),
    "imagenet-spikingformer-8-768.yaml": (
        write_imagefolder, ["data.image_size=32", "data.load_size=40", "extract.logits_topk=1",
                            "teacher.model=vit_tiny_patch16_224",
                            "teacher.input_size=224", TINY_CML, *TINY_RECIPE, "augment.mix_off_epoch=0"], None),
    "mnist5k-recipe.yaml": (  # the embedded digits: nothing to write
        lambda root: None, ["data.limit=64", "student.model_kwargs.widths=[8,16,32]", *TINY_RECIPE], "none"),
    "cifar10dvs-sew.yaml": (
        lambda root: write_hdf5(root, "frames", (4, 2, 128, 128), {"train": 12, "test": 6}, np.float32),
        [f"student.model_kwargs={TINY_DVS}", f"teacher.model_kwargs={TINY_DVS}", "extract.views=1"], None),
}

# What each row's published mode distils (the line train-student prints): the official BKD forms.
PUBLISHED_FORM = {
    "cifar10-spikingformer-4-384.yaml": "map -> pre_logits (BKD cml)",
    "cifar100-spikingformer-4-384.yaml": "map -> pre_logits (BKD cml)",
    "imagenet-spikingformer-8-768.yaml": "map -> pre_logits (BKD cml)",
    "imagenet-sew-resnet18.yaml": "backbone.layer4 -> layer4 (BKD map)",
    "imagenet-sew-resnet34.yaml": "backbone.layer4 -> layer4 (BKD map)",
    "imagenet-sew-resnet50.yaml": "backbone.layer4 -> layer4 (BKD map)",
    "cifar10dvs-sew.yaml": "conv.9 -> conv.9 (BKD map)",
    "mnist5k-recipe.yaml": "pre_logits -> pre_logits (BKD pooled)",
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(FAMILIES))
def test_config_family_end_to_end(tmp_path, config):
    write, overrides, extra_mode = FAMILIES[config]
    write(tmp_path / "data")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    args = ["--config", f"configs/{config}", "--set", f"data.root={tmp_path / 'data'}"]
    for override in ["extract.views=2", "extract.chunk_size=4", "extract.chunks_per_shard=2", "loader.workers=0",
                     "teacher.epochs=1", "teacher.batch_size=8", "extract.batch_size=8",
                     "student.epochs=1", "student.batch_size=8"] + overrides:
        args += ["--set", override]
    run_bkd(["train-teacher", *args], tmp_path)
    run_bkd(["extract-teacher", *args], tmp_path)
    cfg = load_config(tmp_path / "configs" / config, [a for a in args[2:] if a != "--set"])
    info = json.loads(run_bkd(["cache", "info", cfg.extract.store, "--json"], tmp_path).stdout)
    assert info["complete"] and info["views"]["train"] == cfg.extract.views
    assert info["manifest"]["features"]["logits_topk"] == cfg.extract.logits_topk
    for mode in [cfg.student.distill] + ([extra_mode] if extra_mode else []):
        run_dir = f"runs/{mode}"
        trained = run_bkd(["train-student", *args, "--distill", mode, "--run-dir", run_dir], tmp_path)
        said = trained.stdout + trained.stderr  # the feature pairs and the BKD form the row asks for
        if mode == cfg.student.distill:
            assert f"student[{mode}] distils {mode}: {PUBLISHED_FORM[config]}" in said
        elif mode == "none":
            assert f"student[{mode}] distils {mode}" in said
        else:
            assert f"student[{mode}] distils {mode}: " in said and "(regression)" in said
        run_bkd(["evaluate", *args, "--distill", mode, "--run-dir", run_dir, "--metrics", f"{mode}.json",
                 "--plots-dir", f"plots/{mode}"], tmp_path)
        metrics = json.loads((tmp_path / f"{mode}.json").read_text())
        assert 0.0 <= metrics["top1"] <= 1.0 and metrics["firing_rate"] >= 0


@pytest.mark.parametrize("layout, key, warned", [
    ({}, "images", None), ({"chunks": (1, 1, 8, 8)}, "images", None),
    ({"chunks": (8, 1, 8, 8), "compression": "gzip"}, "images", "extract.images: true"),
    ({"chunks": (8, 2, 2, 8, 8)}, "frames", "rewrite the file with one row a chunk")])
def test_training_warns_when_shuffled_reads_decompress_whole_chunks(tmp_path, layout, key, warned):
    from pipeline.data import scattered_read_warning

    shape = (1, 8, 8) if key == "images" else (2, 2, 8, 8)
    with h5py.File(tmp_path / "train.h5", "w") as fh:
        fh.create_dataset(key, data=np.zeros((16, *shape), np.uint8 if key == "images" else np.float32), **layout)
        fh.create_dataset("labels", data=np.arange(16) % 2)
    split = load_split(load_config(None, [f"data.name={'hdf5' if key == 'images' else 'dvs_hdf5'}",
                                          f"data.root={tmp_path}"]).data, "train")
    warning = scattered_read_warning(split)
    if warned is None:
        assert warning is None
    else:
        assert warning.startswith("warning: ") and "8 rows a chunk" in warning and warned in warning
        assert (key == "frames") == ("extract.images" not in warning)  # the store holds no event frames
