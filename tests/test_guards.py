"""Values that only end-to-end runs would otherwise touch: the pixel check of a lazily read split
beyond its first rows, the K views an extraction stores, and top-k and teacher accuracy."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from pipeline import checkpoint
from pipeline.augment import view_augmenter
from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.errors import StoreError
from pipeline.metrics import accuracy, topk_accuracy
from pipeline.student.evaluate import teacher_accuracy
from pipeline.student.stream import open_student_targets
from pipeline.targets import PIXEL_CHECK_SAMPLES, TeacherTargets, check_student_targets
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.models import create_teacher, load_teacher, teacher_outputs
from tests.helpers import N_TRAIN, REPO, build_store, image_split, write_hdf5

CPU = torch.device("cpu")


def _config(tmp: Path, *extra: str):
    """A train-split extraction of pre_logits, everything under `tmp`."""
    return load_config(REPO / "params.yaml", [
        "extract.splits=[train]", "extract.features=[pre_logits]", "teacher.device=cpu",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}", f"extract.store={tmp / 'store.zarr'}",
        f"extract.identity={tmp / 'store.identity.json'}", *extra])


def _random_teacher(cfg) -> None:
    """A random teacher at cfg.teacher.checkpoint whose residual blocks all contribute (timm zeroes the
    last norm of each block, which leaves a random ResNet nearly blind to a small shift)."""
    split = load_split(cfg.data, "train")
    torch.manual_seed(0)
    model = create_teacher(cfg.teacher, split.num_classes, split.image_shape)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    checkpoint.save_weights(model.state_dict(), cfg.teacher.checkpoint)


# ---------------------------------------------------------------------------------------------
# The pixel check of a lazily read split
# ---------------------------------------------------------------------------------------------


def test_pixel_check_of_a_lazy_split_reaches_past_its_first_rows(tmp_path):
    """An HDF5 split of 300 samples (more than PIXEL_CHECK_SAMPLES, so only a spread is checked) whose
    samples from store row 256 on were rewritten after extraction: the run is refused, and the rows
    checked span the whole split."""
    n = 300
    assert n > PIXEL_CHECK_SAMPLES

    def config(root: Path):
        return _config(tmp_path, "data.name=hdf5", f"data.root={root}", "data.limit=null", "extract.chunk_size=64",
                       "extract.chunks_per_shard=2", "extract.batch_size=128")

    write_hdf5(tmp_path / "data", "images", (1, 8, 8), {"train": n, "test": 10})
    cfg = config(tmp_path / "data")
    _random_teacher(cfg)
    extract_teacher(cfg, CPU)
    split = load_split(cfg.data, "train")
    assert not split.in_memory and len(split) == n
    open_student_targets(cfg, "train", split)  # the files the teacher saw: accepted

    shutil.copytree(tmp_path / "data", tmp_path / "other")
    changed = split.ids[PIXEL_CHECK_SAMPLES:]  # the files' rows behind store rows 256..299
    with h5py.File(tmp_path / "other" / "train.h5", "r+") as fh:
        images = fh["images"][:]
        images[changed] = 255 - images[changed]
        fh["images"][...] = images
    other_cfg = config(tmp_path / "other")
    other = load_split(other_cfg.data, "train")
    np.testing.assert_array_equal(other.ids, split.ids)  # same samples and labels, other pixels
    with pytest.raises(StoreError, match="built from other inputs: train sample"):
        open_student_targets(other_cfg, "train", other)
    targets = TeacherTargets(other_cfg.extract.store, "train")
    sha = checkpoint.sha256_file(cfg.teacher.checkpoint)
    differing, checked = check_student_targets(targets, other_cfg, other, sha,
                                               view_augmenter(other_cfg.augment, other).spec(), read_stored=True)
    assert checked == PIXEL_CHECK_SAMPLES
    # a spread over the split: the rows past 256 are checked about in proportion (38 of the 256)
    assert differing >= PIXEL_CHECK_SAMPLES * (n - PIXEL_CHECK_SAMPLES) / n / 2


# ---------------------------------------------------------------------------------------------
# The K views an extraction stores
# ---------------------------------------------------------------------------------------------


def _expected_view(raw: np.ndarray, top: int, left: int, pad: int) -> np.ndarray:
    """A pad_crop_flip view (no flip) of one raw image (C, H, W): the crop at (top, left) of the image
    zero-padded by `pad`."""
    c, h, w = raw.shape
    canvas = np.zeros((c, h + 2 * pad, w + 2 * pad), raw.dtype)
    canvas[:, pad:pad + h, pad:pad + w] = raw
    return canvas[:, top:top + h, left:left + w]


def test_extraction_stores_k_distinct_views_each_as_drawn_for_its_sample_and_view(tmp_path):
    """K = 3 pad_crop_flip views of 20 8x8 images: view v of sample i has the parameters drawn from
    default_rng([augment.seed, 0, i, v]) (view 0: the clean input), and its stored features and logits
    are the teacher's on that crop, built here from the raw pixels; a sample's views differ."""
    views, n = 3, 20
    write_hdf5(tmp_path / "data", "images", (1, 8, 8), {"train": n, "test": 10})
    cfg = _config(tmp_path, "data.name=hdf5", f"data.root={tmp_path / 'data'}", "data.limit=null",
                  f"extract.views={views}", "extract.chunk_size=8", "extract.chunks_per_shard=2", "extract.batch_size=16")
    pad = cfg.augment.pad
    assert cfg.augment.kind == "pad_crop_flip" and not cfg.augment.flip
    _random_teacher(cfg)
    extract_teacher(cfg, CPU)
    split = load_split(cfg.data, "train")
    stored = TeacherTargets(cfg.extract.store, "train").read_rows(0, n)
    assert stored["logits"].shape == (n, views, split.num_classes)

    expected_params = np.empty((n, views, 3), np.int32)
    for i in range(n):
        expected_params[i, 0] = [pad, pad, 0]
        for v in range(1, views):
            top, left = np.random.default_rng([cfg.augment.seed, 0, i, v]).integers(0, 2 * pad + 1, size=2)
            expected_params[i, v] = [top, left, 0]
    np.testing.assert_array_equal(stored["view_params"], expected_params)
    assert (expected_params[:, 1] != expected_params[:, 2]).any(1).sum() >= n // 2  # views 1 and 2 mostly differ

    raw = split.load_raw(range(n))
    inputs = np.stack([[_expected_view(raw[i], *expected_params[i, v, :2], pad) for v in range(views)]
                       for i in range(n)])  # (n, K, C, H, W)
    inputs = (torch.from_numpy(inputs).float() * split.scale - split.mean) / split.std
    model = load_teacher(cfg.teacher, split.num_classes, split.image_shape).eval()
    with torch.no_grad():
        features, logits = teacher_outputs(model, inputs.flatten(0, 1), ["pre_logits"])
    want = {"logits": logits.view(n, views, -1).numpy(),
            "features.pre_logits": features["pre_logits"].view(n, views, -1).numpy()}
    for name, values in want.items():
        got = stored[name].astype(np.float32)
        scale = np.abs(values).max()
        np.testing.assert_allclose(got, values, rtol=0, atol=2e-3 * scale, err_msg=name)  # float16 in the store
        for i in range(n):
            for v in range(views):
                # each stored view is nearest to its own crop among the sample's K crops
                distances = np.abs(values[i] - got[i, v]).max(axis=1)
                assert distances[v] == distances.min(), (name, i, v)
                for u in range(v):
                    if (expected_params[i, u] != expected_params[i, v]).any():
                        assert np.abs(got[i, u] - got[i, v]).max() > 10 * 2e-3 * scale, (name, i, u, v)


# ---------------------------------------------------------------------------------------------
# Top-k and teacher accuracy
# ---------------------------------------------------------------------------------------------


def test_topk_accuracy_on_hand_made_logits():
    logits = torch.tensor([
        [5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top 1
        [0.0, 0.5, 5.0, 4.0, 3.0, 2.0, 1.0],  # label 1: 6th largest
        [1.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0],  # label 2: tied for the top with class 1
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],  # label 3: tied with every other class below class 6
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # label 0: last
    ])
    labels = torch.tensor([0, 1, 2, 3, 0])
    assert topk_accuracy(logits[[0, 1, 4]], labels[[0, 1, 4]], 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits[[0, 1, 4]], labels[[0, 1, 4]], 5) == pytest.approx(1 / 3)  # 6th is not in the top 5
    assert topk_accuracy(logits[[0, 1, 4]], labels[[0, 1, 4]], 6) == pytest.approx(2 / 3)
    assert topk_accuracy(logits[[2]], labels[[2]], 2) == 1.0  # both tied classes fit in the top 2
    assert topk_accuracy(logits[[3]], labels[[3]], 7) == 1.0
    assert topk_accuracy(logits, labels, 7) == 1.0
    assert topk_accuracy(logits, labels, 100) == 1.0  # k beyond the classes: every class
    two = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    two_labels = torch.tensor([1, 1, 0, 0])
    assert topk_accuracy(two, two_labels, 1) == 0.5
    assert topk_accuracy(two, two_labels, 5) == 1.0  # top-5 of a two-class problem
    # classes 0 and 1 tie for the top: the top 2 holds both, the top 1 neither class 2 nor both
    tie = torch.tensor([[2.0, 2.0, 0.0]] * 4)
    assert topk_accuracy(tie, torch.tensor([2, 2, 2, 2]), 1) == 0.0  # a tie above the label keeps it out
    assert topk_accuracy(tie, torch.tensor([0, 1, 2, 2]), 2) == 0.5


class _Lookup(nn.Module):
    """Predicts `classes[j]` for an input equal to `inputs[j]`; in training mode it predicts class 0
    for everything (so evaluation must run in eval mode)."""

    def __init__(self, inputs: torch.Tensor, classes: torch.Tensor, num_classes: int):
        super().__init__()
        self.inputs, self.classes, self.num_classes = inputs.flatten(1), classes, num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        match = (x.flatten(1)[:, None] == self.inputs[None]).all(2)
        assert (match.sum(1) == 1).all()
        predicted = self.classes[match.float().argmax(1)]
        if self.training:
            predicted = torch.zeros_like(predicted)
        return nn.functional.one_hot(predicted, self.num_classes).float() * self.scale


def test_accuracy_counts_the_models_eval_mode_predictions_over_every_batch():
    """1,100 samples (three evaluation batches, the last short) of which exactly 617 are predicted right,
    spread over all the batches: accuracy 617/1100, and the model is left in the mode it was in."""
    n, right = 1100, 617
    labels = np.random.default_rng(1).integers(0, 10, n)
    split = image_split(labels, seed=3)
    assert len({tuple(x.flatten().tolist()) for x in split.load(range(n))}) == n  # inputs tell samples apart
    correct = np.zeros(n, bool)
    correct[np.random.default_rng(2).choice(n, right, replace=False)] = True
    predicted = np.where(correct, labels, (labels + 1 + np.arange(n) % 9) % 10)
    model = _Lookup(split.load(range(n)), torch.from_numpy(predicted), 10)
    model.train()
    assert accuracy(model, split, CPU) == right / n
    assert model.training
    model.eval()
    assert accuracy(model, split, CPU) == right / n
    assert not model.training


def test_teacher_accuracy_from_stored_logits_counts_view_zero_of_every_chunk(tmp_path):
    """The teacher's top-1 from a store's cached logits: view 0's argmax against the labels, over all
    chunks (the last one short)."""
    data = build_store(tmp_path / "s.zarr")["train"]
    predicted = data["logits"][:, 0].astype(np.float16).argmax(1)  # as stored
    labels = np.where(np.arange(N_TRAIN) % 3 == 0, predicted, (predicted + 1) % 10)
    targets = TeacherTargets(tmp_path / "s.zarr", "train")
    assert N_TRAIN % targets.chunk_size
    assert teacher_accuracy(targets, torch.from_numpy(labels)) == 100 / N_TRAIN
    other_views = data["logits"][:, 1].astype(np.float16).argmax(1)
    assert (other_views == labels).mean() != 100 / N_TRAIN  # another view would give another value
