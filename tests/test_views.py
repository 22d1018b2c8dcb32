"""Augmentation-consistent cached views: drawing, applying, extraction, and what training rebuilds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint
from pipeline.augment import KINDS, MIX, PARAM_NAMES, ParamLayout, ViewAugmenter, view_augmenter, view_schedule
from pipeline.config import AugmentConfig, load_config
from pipeline.data import load_split
from pipeline.errors import ConfigError, StoreError
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.models import create_teacher
from pipeline.targets import TeacherTargets, bytes_on_disk
from pipeline.student.stream import CachedTargetDataset, open_student_targets
from tests.helpers import REPO, rewrite_manifest

CONFIG = REPO / "params.yaml"


# ---------------------------------------------------------------------------------------------
# Drawing and applying view parameters
# ---------------------------------------------------------------------------------------------


def _augmenter(kind: str, shape=(1, 12, 12), **overrides) -> ViewAugmenter:
    return ViewAugmenter(dataclasses.replace(AugmentConfig(kind=kind), **overrides), shape)


@pytest.mark.parametrize("kind", sorted(PARAM_NAMES))
def test_draw_is_a_pure_function_of_seed_index_and_view(kind):
    aug = _augmenter(kind, flip=True)
    params = aug.draw(np.arange(50), 6)
    assert params.shape == (50, 6, len(PARAM_NAMES[kind])) and params.dtype == np.int32
    assert (params[:, 0] == aug.identity()).all()  # view 0 is the clean input
    np.testing.assert_array_equal(params, aug.draw(np.arange(50), 6))
    # a sample's views do not depend on which other samples are drawn with it, nor on K
    np.testing.assert_array_equal(params[17:23, :4], aug.draw(np.arange(17, 23), 4))
    if kind != "none":
        other = _augmenter(kind, flip=True, seed=1).draw(np.arange(50), 6)
        assert not np.array_equal(params[:, 1:], other[:, 1:])
        assert len({tuple(p) for p in params[:, 1:].reshape(-1, params.shape[2])}) > 10  # really random


def test_pad_crop_ranges_and_flip_off():
    aug = _augmenter("pad_crop_flip", pad=3, flip=False)
    params = aug.draw(np.arange(400), 4)[:, 1:]
    assert params[..., :2].min() == 0 and params[..., :2].max() == 6  # every offset in [0, 2 * pad] occurs
    assert (params[..., 2] == 0).all()
    flips = _augmenter("pad_crop_flip", flip=True).draw(np.arange(400), 2)[:, 1, 2]
    assert 0.4 < flips.mean() < 0.6


def test_pad_crop_shifts_and_fills_with_black():
    # normalized = (raw - 1.5) / 1: raw black (0) pads as -1.5
    aug = ViewAugmenter(AugmentConfig(kind="pad_crop_flip", pad=2), (1, 5, 5), mean=torch.tensor([1.5]))
    image = torch.arange(1, 26, dtype=torch.uint8).view(1, 1, 5, 5)
    # top = pad + 1, left = pad - 2: the content moves up by 1 and right by 2
    out = aug.apply(image, np.array([[3, 0, 0]]))[0, 0]
    expected = torch.full((5, 5), -1.5)
    expected[:4, 2:] = image[0, 0, 1:, :3].float() - 1.5
    assert torch.equal(out, expected)
    flipped = aug.apply(image, np.array([[3, 0, 1]]))[0, 0]
    assert torch.equal(flipped, expected.flip(-1))
    assert aug.apply(image, aug.identity()[None]) is not None
    assert torch.equal(aug.apply(image, aug.identity()[None]), image.float() - 1.5)  # identity: bit for bit


def test_resized_crop_matches_torchvision_and_event_roll():
    import torchvision.transforms.v2.functional as TF

    aug = _augmenter("resized_crop_flip", shape=(3, 16, 16), flip=True)
    image = torch.rand(1, 3, 16, 16)
    params = aug.draw(np.array([5]), 3)[0]
    for p in params[1:]:
        top, left, h, w, flip = p.tolist()
        assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 16
        expected = TF.resized_crop(image[0], top, left, h, w, [16, 16], antialias=True)
        expected = expected.flip(-1) if flip else expected
        assert torch.equal(aug.apply(image, p[None])[0], expected)

    events = _augmenter("event_flip_roll", shape=(4, 2, 8, 8), max_roll=2)
    frames = torch.rand(1, 4, 2, 8, 8)
    out = events.apply(frames, np.array([[1, -2, 0]]))
    assert torch.equal(out, torch.roll(frames, shifts=(1, -2), dims=(-2, -1)))


def test_param_layout_names_each_part_of_the_vector():
    cfg = AugmentConfig(kind="resized_crop_flip", randaugment="rand-m9-n1-mstd0.4-inc1", mixup=0.5, mix_views=1)
    layout = ParamLayout.of(cfg)
    own = ("top", "left", "height", "width", "flip", "recipe_seed")
    assert layout.names == (*own, *MIX, *(f"p_{name}" for name in own))
    assert layout.names[layout["own"]] == own and layout.names[layout["mix"]] == MIX
    assert layout.names[layout["partner"]] == tuple(f"p_{name}" for name in own)
    assert layout.to_manifest() == {"base": [0, 5], "recipe": [5, 6], "mix": [6, 13], "partner": [13, 19]}
    plain = ParamLayout.of(AugmentConfig(kind="pad_crop_flip"))  # no recipe, no mix: empty parts
    assert plain.names == ("top", "left", "flip") and plain.to_manifest()["recipe"] == [3, 3]
    aug = ViewAugmenter(cfg, (3, 16, 16))
    assert aug.param_names == layout.names and aug.spec()["view_layout"] == layout.to_manifest()
    assert set(KINDS) == set(PARAM_NAMES) and all(KINDS[k].fields == PARAM_NAMES[k] for k in KINDS)


def test_view_schedule_covers_every_view_and_is_reproducible():
    k, n = 5, 300
    epochs = np.stack([view_schedule(n, k, e, seed=3) for e in range(k)])
    assert (np.sort(epochs, axis=0) == np.arange(k)[:, None]).all()  # each sample: every view once in K epochs
    np.testing.assert_array_equal(epochs, np.stack([view_schedule(n, k, e, seed=3) for e in range(k)]))
    assert not np.array_equal(epochs[0], view_schedule(n, k, 0, seed=4))
    assert len(np.unique(epochs[0])) == k  # in one epoch, samples are spread over the views
    assert (view_schedule(n, 1, 7, seed=0) == 0).all()


# ---------------------------------------------------------------------------------------------
# Extraction with K views, and the student's rebuilt inputs
# ---------------------------------------------------------------------------------------------


def _tiny_cfg(tmp: Path, views: int, *extra: str):
    return load_config(CONFIG, [
        "data.limit=96", "data.test_size=500", "extract.chunk_size=16", "extract.chunks_per_shard=2",
        "extract.splits=[train]", f"extract.views={views}", "teacher.device=cpu", "student.device=cpu",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}", f"extract.store={tmp / f'k{views}.zarr'}",
        "student.model_kwargs.widths=[8,16,32]", "extract.features=[pre_logits]", *extra,
    ])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A randomly initialised teacher (accuracy does not matter here), saved like a trained one."""
    tmp = tmp_path_factory.mktemp("views")
    cfg = _tiny_cfg(tmp, 1)
    split = load_split(cfg.data, "train")
    torch.manual_seed(0)
    teacher = create_teacher(cfg.teacher, split.num_classes, split.image_shape)
    checkpoint.save_weights(teacher.state_dict(), cfg.teacher.checkpoint)
    return tmp


@pytest.fixture(scope="module")
def extracted(teacher_dir):
    """Stores with K = 1, 2, 4 views, and every input the teacher was fed for K = 4."""
    import pipeline.teacher.extract as extract_module

    fed: list[torch.Tensor] = []
    real = extract_module.teacher_outputs

    def recording(model, images, *args):
        fed.append(images.clone())
        return real(model, images, *args)

    stores = {}
    for k in (1, 2, 4):
        cfg = _tiny_cfg(teacher_dir, k)
        extract_module.teacher_outputs = recording
        try:
            fed.clear()
            extract_teacher(cfg, torch.device("cpu"))
        finally:
            extract_module.teacher_outputs = real
        stores[k] = (cfg, fed[1:])  # the first call only probes the feature shape
    return stores


def test_student_rebuilds_exactly_the_teacher_input(extracted):
    cfg, fed = extracted[4]
    # Extraction feeds, per shard (32 rows) and batch, views 0..3 in turn.
    per_shard, batch = 32, cfg.extract.batch_size
    assert batch >= per_shard
    teacher_saw = {}
    for shard, start in enumerate(range(0, 96, per_shard)):
        for v in range(4):
            images = fed[shard * 4 + v]
            for r in range(len(images)):
                teacher_saw[(start + r, v)] = images[r]

    train = load_split(cfg.data, "train")
    targets = open_student_targets(cfg, "train", train)
    dataset = CachedTargetDataset(train, targets, 2, view_augmenter(cfg.augment, train), "views", seed=cfg.seed)
    stored = targets.read_rows(0, len(targets))
    rng = np.random.default_rng(0)
    checked = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in rng.choice(96, size=12, replace=False).tolist():
            v = int(dataset.schedule[i])
            image, _, features, logits, _ = dataset[i]
            feature = features["pre_logits"]
            assert torch.equal(image, teacher_saw[(i, v)]), (i, v)  # bit for bit
            assert torch.equal(feature, torch.from_numpy(stored["features.pre_logits"][i, v]).float())
            assert torch.equal(logits, torch.from_numpy(stored["logits"][i, v]).float())
            checked.add(v)
    assert checked == {0, 1, 2, 3}
    # the augmented views really differ from the clean input
    assert sum(not torch.equal(teacher_saw[(i, 1)], teacher_saw[(i, 0)]) for i in range(96)) > 48


def test_store_grows_linearly_with_views_and_view0_is_the_clean_extraction(extracted):
    sizes = {k: bytes_on_disk(cfg.extract.store) for k, (cfg, _) in extracted.items()}
    per_view_1_2, per_view_2_4 = sizes[2] - sizes[1], (sizes[4] - sizes[2]) / 2
    assert 0.85 < per_view_2_4 / per_view_1_2 < 1.15, sizes
    clean = TeacherTargets(extracted[1][0].extract.store, "train").read_rows(0, 96)
    for k in (2, 4):
        rows = TeacherTargets(extracted[k][0].extract.store, "train").read_rows(0, 96)
        assert rows["features.pre_logits"].shape == (96, k, clean["features.pre_logits"].shape[2])
        np.testing.assert_array_equal(rows["features.pre_logits"][:, 0], clean["features.pre_logits"][:, 0])
        np.testing.assert_array_equal(rows["logits"][:, 0], clean["logits"][:, 0])


def test_topk_extraction_writes_what_the_losses_need(teacher_dir):
    """extract.logits_topk: the store holds the top k, the target classes (from the augmenter), the
    logits there and the tail's statistics, as computed from the full logits of the same teacher."""
    from pipeline.augment import view_augmenter
    from pipeline.targets import TOPK_INDEX, TOPK_TAIL, TOPK_TARGET, TOPK_TARGET_CLASS, topk_arrays

    stores = {}
    for k in (None, 3):
        cfg = _tiny_cfg(teacher_dir, 2, "extract.logits_dtype=float32", f"extract.logits_topk={k or 'null'}",
                        f"extract.store={teacher_dir / f'top{k}.zarr'}")
        extract_teacher(cfg, torch.device("cpu"))
        stores[k] = TeacherTargets(cfg.extract.store, "train")
    full, top = stores[None].read_rows(0, 96), stores[3]
    raw = {name: top.arrays[name][:] for name in (TOPK_INDEX, TOPK_TARGET_CLASS, TOPK_TARGET, TOPK_TAIL)}
    train = load_split(cfg.data, "train")
    classes = view_augmenter(cfg.augment, train).target_classes(full["labels"], full["view_params"])
    assert classes.shape == (96, 2, 2) and (classes == full["labels"][:, None, None]).all()
    np.testing.assert_array_equal(raw[TOPK_TARGET_CLASS], classes)
    expected = topk_arrays(full["logits"], 3, classes)
    for name in raw:
        np.testing.assert_allclose(raw[name], expected[name], rtol=1e-5, atol=1e-5)
    assert top.spec.row_arrays()[-4:] == (TOPK_INDEX, TOPK_TARGET_CLASS, TOPK_TARGET, TOPK_TAIL)
    dense = top.read_rows(0, 96)["logits"]
    ce = lambda z: torch.nn.functional.cross_entropy(  # noqa: E731
        torch.from_numpy(z).flatten(0, 1), torch.from_numpy(classes[..., 0]).flatten(), reduction="none")
    torch.testing.assert_close(ce(dense), ce(full["logits"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override, field", [
    ("augment.seed=5", "augment"),
    ("augment.pad=3", "augment"),
    ("augment.kind=resized_crop_flip", "augment"),
    ("teacher.input_size=32", "transform"),
])
def test_store_of_another_augmentation_is_refused(extracted, override, field):
    cfg, _ = extracted[4]
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in _flatten(cfg.to_dict())] + [override])
    train = load_split(cfg.data, "train")
    with pytest.raises(StoreError, match=field.replace(".", r"\.")):
        open_student_targets(cfg, "train", train)


def test_store_of_another_view_layout_is_refused(extracted, tmp_path):
    """The store records the layout of its view parameters; a reader whose layout differs refuses it."""
    import shutil

    cfg, _ = extracted[4]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cfg.extract.store, copy)
    rewrite_manifest(copy, lambda m: m.__setitem__("augment", {**m["augment"],
                                                              "view_layout": {"recipe": [0, 0], "base": [0, 3]}}))
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in _flatten(cfg.to_dict())] + [f"extract.store={copy}"])
    with pytest.raises(StoreError, match=r"augment\.view_layout") as info:
        open_student_targets(cfg, "train", load_split(cfg.data, "train"))
    assert "\n" not in str(info.value)


def test_student_takes_the_views_from_the_store(extracted):
    cfg, _ = extracted[4]
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in _flatten(cfg.to_dict())] + ["extract.views=2"])
    targets = open_student_targets(cfg, "train", load_split(cfg.data, "train"))
    assert targets.views == 4 and targets.spec.splits["train"]["views"] == 4


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("model_kwargs", "features", "lasnn_features"):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value if value is not None else "null"


def test_online_policy_augments_freshly_with_clean_targets(extracted):
    cfg, _ = extracted[4]
    train = load_split(cfg.data, "train")
    targets = open_student_targets(cfg, "train", train)
    dataset = CachedTargetDataset(train, targets, 2, view_augmenter(cfg.augment, train), "online", seed=0)
    stored = targets.read_rows(0, 96)
    images0, _, features, _, _ = dataset.__getitems__(list(range(96)))
    torch.testing.assert_close(features["pre_logits"], torch.from_numpy(stored["features.pre_logits"][:, 0]).float(),
                               rtol=0, atol=0)
    assert not torch.equal(images0.to("cpu"), train.load(range(96)))
    dataset.set_epoch(1)
    images1, *_ = dataset.__getitems__(list(range(96)))
    assert not torch.equal(images0.to("cpu"), images1.to("cpu"))  # fresh every epoch


# ---------------------------------------------------------------------------------------------
# Config refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fragment", [
    (["augment.mixup=0.2"], "mixup/cutmix"),
    (["augment.mix_views=1", "extract.views=2"], "mix_views"),
    (["extract.views=0"], "extract.views"),
    (["extract.views=4", "augment.kind=none"], "needs an augmentation"),
    (["augment.kind=rotate"], "augment.kind"),
    (["augment.scale=[0.5, 0.2]"], "augment.scale"),
    (["student.augment=sometimes"], "student.augment"),
])
def test_bad_view_configs_refused(overrides, fragment):
    from pipeline.registry import check_names

    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        check_names(load_config(CONFIG, overrides))
