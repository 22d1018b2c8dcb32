"""The published training recipe replayed from the cache: RandAugment, random erasing, mixup and
cutmix as stored view parameters, the teacher fed exactly the image the student later rebuilds,
soft targets (label smoothing, mixed labels) reaching CE and WSLD, and mixing switched off at an epoch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import CUTMIX, MIXUP, ViewAugmenter, partner_inputs, view_augmenter, view_schedule
from pipeline.config import AugmentConfig, load_config
from pipeline.data import load_split
from pipeline.errors import ConfigError, StoreError
from pipeline.student.stream import CachedTargetDataset, open_student_targets
from tests.helpers import extract_recording

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "params.yaml"
RECIPE = ["augment.randaugment=rand-m9-n1-mstd0.4-inc1", "augment.erasing=0.25", "augment.mixup=0.5",
          "augment.cutmix=1.0", "augment.mix_views=2", "extract.views=4"]


def _cfg(tmp: Path, *extra: str):
    return load_config(CONFIG, [
        "data.limit=64", "data.test_size=500", "extract.chunk_size=16", "extract.chunks_per_shard=2",
        "extract.splits=[train]", "teacher.device=cpu", "student.device=cpu", "extract.features=[pre_logits]",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}", f"extract.store={tmp / 'recipe.zarr'}",
        "student.model_kwargs.widths=[8,16,32]", *RECIPE, *extra,
    ])


@pytest.fixture(scope="module")
def recipe_store(tmp_path_factory):
    """A K = 4 store with the full recipe (views 2 and 3 mixed), and every input the teacher was fed."""
    cfg = _cfg(tmp_path_factory.mktemp("recipe"))
    return cfg, load_split(cfg.data, "train"), extract_recording(cfg)


@pytest.mark.parametrize("ops", [
    ["augment.erasing=0", "augment.mixup=0", "augment.cutmix=0", "augment.mix_views=0"],  # RandAugment alone
    ["augment.randaugment=", "augment.mixup=0", "augment.cutmix=0", "augment.mix_views=0"],  # erasing alone
    ["augment.randaugment=", "augment.erasing=0", "augment.cutmix=0"],  # mixup alone
    ["augment.randaugment=", "augment.erasing=0", "augment.mixup=0"],  # cutmix alone
], ids=["randaugment", "erasing", "mixup", "cutmix"])
def test_each_op_alone_round_trips_bit_for_bit(tmp_path, ops):
    cfg = _cfg(tmp_path, "data.limit=32", "extract.views=3", "augment.kind=none", *ops,
               *(["augment.mix_views=1"] if "augment.mix_views=0" not in ops else []))
    teacher_saw = extract_recording(cfg)
    split = load_split(cfg.data, "train")
    targets = open_student_targets(cfg, "train", split)
    dataset = CachedTargetDataset(split, targets, 2, view_augmenter(cfg.augment, split), "views", seed=cfg.seed)
    changed = 0
    for v in range(3):
        dataset.schedule = torch.full((len(split),), v)
        for i in range(32):
            image = dataset[i][0]
            assert torch.equal(image, teacher_saw[(i, v)]), (i, v)
            changed += v > 0 and not torch.equal(image, split.load([i])[0])
    assert changed >= 8  # the op really acts (RandAugment applies its op with p 0.5)


def test_every_view_is_rebuilt_bit_for_bit_with_its_partner(recipe_store):
    cfg, split, teacher_saw = recipe_store
    targets = open_student_targets(cfg, "train", split)
    aug = view_augmenter(cfg.augment, split)
    params = targets.read_rows(0, len(targets))["view_params"]
    dataset = CachedTargetDataset(split, targets, 2, aug, "views", seed=cfg.seed, smoothing=0.1)
    kinds = set()
    for i in range(64):
        for v in range(4):
            dataset.schedule = torch.full((len(split),), v)  # serve view v of every sample
            image, label, _, _, target = dataset[i]
            assert torch.equal(image, teacher_saw[(i, v)]), (i, v)
            p = params[i, v]
            m = aug.mix_fields(p[None])
            mode, partner = int(m.mix[0]), int(m.partner[0])
            kinds.add(mode)
            if mode:  # the right partner: the mix of the two samples' own views, rebuilt independently
                own = aug._apply_own(split.read([i])[0], p[aug.layout["own"]].tolist())
                other = aug._apply_own(split.read([partner])[0], p[aug.layout["partner"]].tolist())
                lam = float(aug.lam(p[None])[0])
                if mode == MIXUP:
                    torch.testing.assert_close(image, own * lam + other * (1 - lam), rtol=0, atol=1e-6)
                else:
                    top, left, h, w = (int(m.box_top[0]), int(m.box_left[0]), int(m.box_height[0]),
                                       int(m.box_width[0]))
                    assert torch.equal(image[..., top:top + h, left:left + w], other[..., top:top + h, left:left + w])
                    assert abs(lam - (1 - h * w / 28**2)) < 1e-6
                want = lam * _smoothed(label, 10, 0.1) + (1 - lam) * _smoothed(split.labels[partner], 10, 0.1)
            else:
                assert v < 2  # views 0 and 1 are unmixed, 2 and 3 mixed
                want = _smoothed(label, 10, 0.1)
            torch.testing.assert_close(target, want)
    assert kinds == {0, MIXUP, CUTMIX}
    # the recipe really acts: RandAugment / erasing change the unmixed augmented views
    assert sum(not torch.equal(teacher_saw[(i, 1)], split.load([i])[0]) for i in range(64)) > 40


def _smoothed(label, classes, eps):
    return torch.full((classes,), eps / classes).scatter(0, torch.as_tensor(label).view(1), 1 - eps + eps / classes)


def test_views_are_a_pure_function_of_seed_sample_and_view():
    aug = ViewAugmenter(AugmentConfig(kind="pad_crop_flip", randaugment="rand-m9-n1-mstd0.4-inc1", erasing=0.25,
                                      mixup=0.5, cutmix=1.0, mix_views=3), (1, 28, 28))
    a = aug.draw(np.arange(40), 6, num_samples=100)
    np.testing.assert_array_equal(a, aug.draw(np.arange(40), 6, num_samples=100))
    np.testing.assert_array_equal(a[10:20], aug.draw(np.arange(10, 20), 6, num_samples=100))
    assert (aug.partners(a[:, 3:].reshape(-1, a.shape[2])) >= 0).all()  # views 3..5 mixed
    assert (aug.partners(a[:, :3].reshape(-1, a.shape[2])) < 0).all()
    partners = aug.partners(a[:, 4])
    assert (partners != np.arange(40)).all() and (partners < 100).all()  # another sample of the split
    other_seed = dataclasses.replace(aug.cfg, seed=1)
    assert not np.array_equal(a, ViewAugmenter(other_seed, (1, 28, 28)).draw(np.arange(40), 6, num_samples=100))
    # applying is deterministic, and leaves the global generators where they were
    image = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)  # raw pixels
    state = (torch.get_rng_state(), np.random.get_state()[1].copy())
    first = aug.apply(image, a[:, 1])
    assert torch.equal(first, aug.apply(image, a[:, 1]))
    assert torch.equal(state[0], torch.get_rng_state()) and np.array_equal(state[1], np.random.get_state()[1])


@pytest.mark.parametrize("op, kwargs", [
    ("randaugment", {"randaugment": "rand-m9-n1-mstd0.4-inc1"}),
    ("erasing", {"erasing": 1.0}),
    ("mixup", {"mixup": 0.5, "mix_views": 1}),
    ("cutmix", {"cutmix": 1.0, "mix_views": 1}),
])
def test_each_op_changes_the_view_and_matches_the_stored_parameters(op, kwargs):
    split = load_split(load_config(CONFIG, ["data.limit=32"]).data, "train")
    aug = view_augmenter(AugmentConfig(kind="none", **kwargs), split)
    params = aug.draw(np.arange(32), 2, num_samples=len(split))[:, 1]
    clean, raw = split.load(range(32)), split.read(range(32))
    views = aug.apply(raw, params, partner_inputs(split, aug, params, raw))
    changed = [not torch.equal(views[i], clean[i]) for i in range(32)]
    assert sum(changed) >= (8 if op == "randaugment" else 28)  # RandAugment applies each op with p 0.5
    if op == "erasing":  # one const box (zeros in the normalized space) per view
        for i in range(32):
            diff = views[i] != clean[i]
            assert (views[i][diff] == 0).all()


def test_schedule_switches_mixing_off_at_the_configured_epoch():
    mixed = range(4, 8)
    for epoch in range(6):
        views = view_schedule(500, 8, epoch, seed=0, mixed=mixed, mix_off_epoch=3)
        if epoch < 3:
            assert set(views.tolist()) == {4, 5, 6, 7}
        else:
            assert set(views.tolist()) == {0, 1, 2, 3}
    never = view_schedule(500, 8, 100, seed=0, mixed=mixed, mix_off_epoch=0)
    assert set(never.tolist()) == {4, 5, 6, 7}
    # over 4 consecutive epochs of one pool, each sample visits each of its views once
    first = np.stack([view_schedule(50, 8, e, seed=2, mixed=mixed) for e in range(4)])
    assert all(sorted(col) == [4, 5, 6, 7] for col in first.T.tolist())


def test_soft_targets_reach_ce_and_wsld_as_computed_independently():
    from pipeline.config import StudentConfig
    from pipeline.student.losses import DistillationLoss

    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10) * 3
    y, y2 = torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    lam = torch.rand(6, 1)
    soft = lam * _batch_smoothed(y, 0.1) + (1 - lam) * _batch_smoothed(y2, 0.1)
    terms = DistillationLoss(StudentConfig(distill="wsld"), [])({}, z_s, soft, {}, z_t)
    ce = -(soft * F.log_softmax(z_s, 1)).sum(1).mean()
    torch.testing.assert_close(terms["ce"], ce)
    p_t = F.softmax(z_t / 2, 1)
    ce_soft = -(p_t * F.log_softmax(z_s / 2, 1)).sum(1)
    ce_s = -(soft * F.log_softmax(z_s.detach(), 1)).sum(1)
    ce_t = -(soft * F.log_softmax(z_t, 1)).sum(1)
    w = 1 - torch.exp(-torch.clamp(ce_s / (ce_t + 1e-7), min=0))
    torch.testing.assert_close(terms["wsld"], 4 * (w * ce_soft).mean())


def _batch_smoothed(y, eps):
    return torch.stack([_smoothed(label, 10, eps) for label in y])


@pytest.mark.parametrize("override, field", [
    ("augment.randaugment=rand-m7-n1-mstd0.4-inc1", r"augment\.randaugment: 'rand-m9"),
    ("augment.erasing=0.5", r"augment\.erasing: 0\.25 in the store, 0\.5 here"),
    ("augment.mixup=0.8", r"augment\.mixup: 0\.5 in the store, 0\.8 here"),
])
def test_a_recipe_the_store_was_not_built_for_is_refused(recipe_store, override, field):
    cfg, split, _ = recipe_store
    other = _cfg(Path(cfg.extract.store).parent, override)
    with pytest.raises(StoreError, match=field):
        open_student_targets(other, "train", split)


def test_mix_off_epoch_is_training_side_only(recipe_store):
    cfg, split, _ = recipe_store
    open_student_targets(_cfg(Path(cfg.extract.store).parent, "augment.mix_off_epoch=3"), "train", split)


@pytest.mark.parametrize("overrides, fragment", [
    (["augment.randaugment=rand-q9"], "augment.randaugment"),
    (["augment.erasing=1.5"], "augment.erasing"),
    (["augment.erasing_mode=blur", "augment.erasing=0.2"], "augment.erasing_mode"),
    (["augment.mix_views=4"], "augment.mix_views"),
    (["student.label_smoothing=1.0"], "student.label_smoothing"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        cfg = _cfg(tmp_path, *overrides)
        view_augmenter(cfg.augment, load_split(cfg.data, "train"))


def test_randaugment_at_the_magnitude_cap_never_fails():
    """Magnitude noise reaches timm's cap, where PosterizeIncreasing would keep 0 bits (Pillow refuses
    that mid-extraction); every view of a strong recipe must build."""
    aug = ViewAugmenter(AugmentConfig(kind="none", randaugment="rand-m10-n3-mstd1.0-inc1"), (3, 16, 16))
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    for seed in range(400):
        assert aug._randaugment(image, seed).shape == image.shape
