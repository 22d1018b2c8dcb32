"""Batches as the published runs draw them: i.i.d., even from files written class by class.

ImageFolder lists samples class by class, and so do many HDF5 and DVS conversions. The splits put
their rows in a seeded random order and the store's rows follow the split, so the student's
chunk-local sampler draws batches with as many classes as i.i.d. sampling gives -- for one process,
for each DDP rank and under loader workers. `data.limit` keeps every class in proportion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.batches import (BATCH, CLASSES, PER_CLASS, TEST_PER_CLASS, class_sorted_config, iid_distinct,
                                sampled_distinct, write_class_sorted)
from benchmarks.common import write_random_teacher
from pipeline.augment import view_augmenter
from pipeline.config import load_config
from pipeline.data import data_loader, load_split, load_splits
from pipeline.errors import BkdError, ConfigError, StoreError
from pipeline.teacher.extract import extract_teacher
from pipeline.student.stream import CachedTargetDataset, open_student_targets, student_sampler
from pipeline.targets import TeacherTargets

CPU = torch.device("cpu")
FORMATS = ("imagenet", "hdf5", "dvs_hdf5")
TOLERANCE = 0.10  # of the i.i.d. expectation


@pytest.mark.parametrize("fmt", FORMATS)
def test_class_sorted_files_give_iid_batches(tmp_path, fmt):
    write_class_sorted(tmp_path / "data", fmt)
    source_labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    for ranks, workers in ((1, 0), (2, 0), (1, 2)):  # one process, two DDP ranks, two loader workers (lanes)
        cfg = class_sorted_config(tmp_path / "data", fmt, f"loader.workers={workers}")
        split = load_split(cfg.data, "train")
        labels = split.labels.numpy()
        assert sorted(labels.tolist()) == source_labels.tolist()  # every row, once
        local = BATCH // ranks
        expected = iid_distinct(labels, local)
        for rank in range(ranks):
            sampler = student_sampler(cfg, len(split), cfg.extract.chunk_size, local, rank, ranks)
            got = sampled_distinct(labels, sampler, local)
            assert abs(got - expected) <= TOLERANCE * expected, (fmt, ranks, workers, rank, got, expected)
            # the files' own order under the same sampler: a handful of classes a batch (what this test catches)
            assert sampled_distinct(source_labels, sampler, local) < (1 - 3 * TOLERANCE) * expected


def test_row_order_is_seeded_and_the_same_for_every_loader(tmp_path):
    write_class_sorted(tmp_path / "data", "hdf5")
    first = load_split(class_sorted_config(tmp_path / "data", "hdf5").data, "train")
    again = load_split(class_sorted_config(tmp_path / "data", "hdf5").data, "train")
    other = load_split(class_sorted_config(tmp_path / "data", "hdf5", "data.split_seed=1").data, "train")
    assert np.array_equal(first.ids, again.ids) and first.fingerprint() == again.fingerprint()
    assert not np.array_equal(first.ids, other.ids) and sorted(first.ids) == sorted(other.ids)
    assert first.fingerprint() != other.fingerprint()
    test = load_split(class_sorted_config(tmp_path / "data", "hdf5").data, "test")
    assert sorted(test.ids.tolist()) == list(range(CLASSES * TEST_PER_CLASS))  # the official test split, whole
    assert not np.array_equal(test.ids, np.arange(len(test)))


@pytest.mark.parametrize("fmt", ["imagenet", "hdf5"])
def test_store_rows_follow_the_shuffled_split_through_the_student_loader(tmp_path, fmt):
    """Extraction writes the rows in the split's order; the student's dataset, sampler and loader (one
    process, two workers) then serve i.i.d. batches, with labels and pixels of the rows they name."""
    write_class_sorted(tmp_path / "data", fmt)
    cfg = class_sorted_config(tmp_path / "data", fmt, f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
                              f"extract.store={tmp_path / 'targets.zarr'}")
    write_random_teacher(cfg)
    extract_teacher(cfg, CPU)
    split = load_split(cfg.data, "train")
    rows = TeacherTargets(cfg.extract.store, "train").read_rows(0, len(split))
    np.testing.assert_array_equal(rows["labels"], split.labels.numpy())
    targets = open_student_targets(cfg, "train", split)  # pixels checked against the store, row by row
    expected = iid_distinct(split.labels.numpy(), BATCH)
    for workers in (0, 2):
        cfg_w = class_sorted_config(tmp_path / "data", fmt, f"loader.workers={workers}")
        dataset = CachedTargetDataset(split, targets, cfg_w.student.shuffle_buffer_chunks,
                                      view_augmenter(cfg.augment, split), "views", seed=cfg.seed)
        sampler = student_sampler(cfg_w, len(dataset), targets.chunk_size, BATCH)
        loader = data_loader(dataset, BATCH, sampler, cfg_w.loader, CPU)
        found, served = [], []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for images, labels, *_ in loader:
                if len(labels) == BATCH:
                    found.append(len(labels.unique()))
                served.append(labels)
        assert abs(np.mean(found) - expected) <= TOLERANCE * expected, (fmt, workers, np.mean(found), expected)
        assert torch.cat(served).bincount().tolist() == [2 * PER_CLASS] * CLASSES  # every row once an epoch


def test_store_of_another_row_order_is_refused_naming_the_seed(tmp_path):
    write_class_sorted(tmp_path / "data", "hdf5")
    cfg = class_sorted_config(tmp_path / "data", "hdf5", f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
                              f"extract.store={tmp_path / 'targets.zarr'}")
    write_random_teacher(cfg)
    extract_teacher(cfg, CPU)
    other = class_sorted_config(tmp_path / "data", "hdf5", f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}",
                                f"extract.store={tmp_path / 'targets.zarr'}", "data.split_seed=5")
    with pytest.raises(StoreError, match="dataset.split_seed: 0 in the store, 5 here"):
        open_student_targets(other, "train", load_split(other.data, "train"))


# -- data.limit: a seeded subset that keeps every class in proportion ----------------------------------

UNEVEN = [5 + 3 * c for c in range(CLASSES)]  # 5, 8, ..., 74 training samples per class


@pytest.mark.parametrize("limit", [24, 100, 333])
def test_limit_keeps_every_class_in_proportion(tmp_path, limit):
    write_class_sorted(tmp_path / "data", "hdf5", counts=UNEVEN)
    split = load_split(class_sorted_config(tmp_path / "data", "hdf5", f"data.limit={limit}").data, "train")
    assert len(split) == limit and len(np.unique(split.ids)) == limit
    got = np.bincount(split.labels.numpy(), minlength=CLASSES)
    share = limit * np.asarray(UNEVEN) / sum(UNEVEN)
    assert (got >= 1).all() and (np.abs(got - share) <= 1).all(), (got, share)
    again = load_split(class_sorted_config(tmp_path / "data", "hdf5", f"data.limit={limit}").data, "train")
    other = load_split(class_sorted_config(tmp_path / "data", "hdf5", f"data.limit={limit}",
                                           "data.split_seed=1").data, "train")
    assert np.array_equal(split.ids, again.ids) and set(split.ids) != set(other.ids)
    # the old rule, the first `limit` rows of the file, would have kept the first few classes only
    first = np.repeat(np.arange(CLASSES), UNEVEN)[:limit]
    assert len(np.unique(first)) < CLASSES


def test_limit_of_a_seeded_split_keeps_every_class_in_proportion():
    full = load_split(load_config(None, ["data.name=digits", "data.test_size=297"]).data, "train")
    split = load_split(load_config(None, ["data.name=digits", "data.test_size=297", "data.limit=150"]).data, "train")
    counts = np.bincount(full.labels.numpy(), minlength=10)
    share = 150 * counts / counts.sum()
    got = np.bincount(split.labels.numpy(), minlength=10)
    assert len(split) == 150 and (np.abs(got - share) <= 1).all()
    assert set(split.ids) <= set(full.ids)
    position = {row: k for k, row in enumerate(full.ids.tolist())}
    kept = [position[row] for row in split.ids.tolist()]
    assert kept == sorted(kept)  # the subset keeps the split's (random) order


# -- data.holdout: a validation split carved from the training split ------------------------------


def test_holdout_carves_validation_from_train_and_never_reads_the_test_split():
    def splits(*overrides):
        cfg = load_config(None, ["data.name=digits", "data.test_size=297", *overrides]).data
        return load_splits(cfg, ["train", "test"])

    plain, held = splits(), splits("data.holdout=300")
    train, test, val = set(plain["train"].ids), set(plain["test"].ids), set(held["test"].ids)
    assert len(held["test"]) == 300 and len(held["train"]) == len(train) - 300
    assert val <= train and not val & test  # validation rows come from train, never from test
    assert set(held["train"].ids) == train - val
    assert held["test"].ids.tolist() == plain["train"].ids[:300].tolist()  # the first rows of the train order
    limited = splits("data.holdout=300", "data.limit=100")  # limit then applies to each side
    assert len(limited["train"]) == len(limited["test"]) == 100
    assert set(limited["test"].ids) <= val and set(limited["train"].ids) <= train - val


def test_holdout_of_an_official_split_reads_only_the_train_file(tmp_path):
    write_class_sorted(tmp_path / "data", "hdf5")
    splits = load_splits(class_sorted_config(tmp_path / "data", "hdf5", "data.holdout=40").data, ["train", "test"])
    train = load_split(class_sorted_config(tmp_path / "data", "hdf5").data, "train")
    assert splits["test"].source.origin == splits["train"].source.origin == train.source.origin
    assert len(splits["test"]) == 40 and len(splits["train"]) == len(train) - 40
    assert not set(splits["test"].ids) & set(splits["train"].ids)


@pytest.mark.parametrize("holdout, fragment", [(-1, "must be >= 0"), (4000, r"must be in \(0, 4000\)")])
def test_holdout_that_leaves_no_training_rows_is_refused(holdout, fragment):
    with pytest.raises(ConfigError, match=f"data.holdout {fragment}"):
        load_splits(load_config(None, [f"data.holdout={holdout}"]).data, ["train", "test"])


def test_limit_below_the_classes_is_one_line(tmp_path):
    write_class_sorted(tmp_path / "data", "hdf5")
    with pytest.raises(ConfigError, match=f"data.limit is 10, below the {CLASSES} classes of the train split") as info:
        load_split(class_sorted_config(tmp_path / "data", "hdf5", "data.limit=10").data, "train")
    assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["imagenet", "hdf5"])
def test_teacher_training_draws_iid_batches_from_class_sorted_files(tmp_path, fmt, monkeypatch):
    """The teacher's own training (stage one) sees i.i.d. batches too: what its loader really serves."""
    import pipeline.teacher.train as train_module

    write_class_sorted(tmp_path / "data", fmt)
    cfg = class_sorted_config(tmp_path / "data", fmt, "teacher.epochs=2", f"teacher.batch_size={BATCH}",
                              f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}", "teacher.device=cpu")
    seen, real = [], train_module.data_loader

    class Recording:  # the loader train_teacher builds, noting the labels of every batch it serves
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for batch in self.loader:
                seen.append(batch[1].clone())
                yield batch

    monkeypatch.setattr(train_module, "data_loader", lambda *args, **kwargs: Recording(real(*args, **kwargs)))
    train_module.train_teacher(cfg, tmp_path / "teacher-run")
    labels = torch.cat(seen)
    assert labels.bincount().tolist() == [2 * PER_CLASS] * CLASSES  # every sample once an epoch
    whole = [len(batch.unique()) for batch in seen if len(batch) == BATCH]
    expected = iid_distinct(labels[:len(labels) // 2].numpy(), BATCH)
    assert abs(np.mean(whole) - expected) <= TOLERANCE * expected, (np.mean(whole), expected)


def test_event_frames_cannot_be_stored_as_images(tmp_path):
    """extract.images holds uint8 pixels: float event counts would be cut to bytes, so it is refused up front."""
    write_class_sorted(tmp_path / "data", "dvs_hdf5")
    cfg = class_sorted_config(tmp_path / "data", "dvs_hdf5", "extract.images=true",
                              f"extract.store={tmp_path / 'targets.zarr'}")
    with pytest.raises(BkdError, match="extract.images stores uint8 image pixels, and dvs_hdf5 samples are float"):
        extract_teacher(cfg, CPU)
    assert not (tmp_path / "targets.zarr").exists()
