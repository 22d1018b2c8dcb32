"""Views cross to the device raw (uint8 images) and are finished there: normalized, erased and mixed.
Finished, they are the views built the reference way on the host -- each step of timm's order on
normalized tensors -- bit for bit on the CPU, for every augmentation kind and recipe; a run trained
either way gives the same weights."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from pipeline.augment import ViewAugmenter, apply_erasing, mix_pixels
from pipeline.augment.mix import Mix
from pipeline.config import AugmentConfig
from pipeline.rawviews import RawViews

MEAN, STD, SCALE = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]), 1 / 255

CASES = {
    "none": AugmentConfig(kind="none"),
    "pad_crop_flip": AugmentConfig(kind="pad_crop_flip", pad=4, flip=True),
    "resized_crop_flip": AugmentConfig(kind="resized_crop_flip", flip=True),
    "randaugment": AugmentConfig(kind="pad_crop_flip", pad=4, randaugment="rand-m9-n2-mstd0.5-inc1"),
    "erasing const": AugmentConfig(kind="pad_crop_flip", erasing=1.0, erasing_mode="const"),
    "erasing rand": AugmentConfig(kind="pad_crop_flip", erasing=1.0, erasing_mode="rand"),
    "erasing pixel": AugmentConfig(kind="resized_crop_flip", erasing=0.7, erasing_mode="pixel"),
    "mixup": AugmentConfig(kind="pad_crop_flip", mixup=0.8, mix_views=2),
    "cutmix": AugmentConfig(kind="pad_crop_flip", cutmix=1.0, mix_views=2),
    "full recipe": AugmentConfig(kind="resized_crop_flip", flip=True, randaugment="rand-m9-n2-mstd0.5-inc1",
                                 erasing=0.5, erasing_mode="pixel", mixup=0.8, cutmix=1.0, mix_views=2),
}


def reference(aug: ViewAugmenter, images: torch.Tensor, params: np.ndarray, partners: torch.Tensor | None):
    """The views built on the host in timm's order, one step after another on normalized tensors."""
    def own_view(image, p):
        raw = aug.kind.apply(image, p[aug.layout["base"]])
        seed = aug._recipe_seed(p)
        if seed >= 0 and aug.randaugment is not None:
            raw = aug._randaugment(raw, seed)
        view = raw.to(torch.float32, copy=True).mul_(aug.scale).sub_(aug.mean).div_(aug.std)
        if seed >= 0 and aug.erasing is not None:
            apply_erasing(aug.erasing, view, seed)
        return view

    out = []
    for b, p in enumerate(params.tolist()):
        view = own_view(images[b], p[aug.layout["own"]])
        m = Mix(*p[aug.layout["mix"]]) if aug.mixes else None
        if m is not None and m.mix > 0:
            view = mix_pixels(view, own_view(partners[b], p[aug.layout["partner"]]), m)
        out.append(view)
    return torch.stack(out)


def batch(cfg: AugmentConfig, n: int = 24, views: int = 4):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, 40, 40), dtype=np.uint8))
    aug = ViewAugmenter(cfg, (3, 32, 32), mean=MEAN, std=STD, scale=SCALE, source_shape=(3, 40, 40))
    params = aug.draw(np.arange(n), views, num_samples=n)
    return aug, images, params


@pytest.mark.parametrize("name", list(CASES))
def test_finished_views_equal_the_host_built_views_bit_for_bit(name):
    aug, images, params = batch(CASES[name])
    partners = images.flip(0)  # any pixels: each row's partner
    acted = 0
    for v in range(params.shape[1]):
        raw = aug.raw_views(images, params[:, v], partners)
        assert raw.raw.dtype == torch.uint8
        finished = raw.to("cpu")
        want = reference(aug, images, params[:, v], partners)
        assert finished.dtype == torch.float32 and torch.equal(finished, want), (name, v)
        acted += not torch.equal(finished, aug.raw_views(images, aug.identity()[None].repeat(len(images), 0)).to("cpu"))
    assert name == "none" or acted  # the augmentation really acts


def test_the_batch_survives_pickling_and_pinning_and_crosses_as_uint8():
    aug, images, params = batch(CASES["full recipe"])
    raw = aug.raw_views(images, params[:, 3], images.flip(0))
    assert raw.partners is not None and len(raw.erased.rows) + len(raw.partner_erased.rows) > 0
    again = pickle.loads(pickle.dumps(raw))  # what a loader worker sends
    assert torch.equal(again.to("cpu"), raw.to("cpu"))
    if torch.cuda.is_available():
        assert torch.equal(raw.pin_memory().to("cpu"), raw.to("cpu"))
    float_bytes = len(images) * 3 * 32 * 32 * 4  # what crossed before: float32 views
    aug, images, params = batch(CASES["randaugment"])
    assert aug.raw_views(images, params[:, 1]).nbytes() == float_bytes / 4 + 2 * 3 * 4  # a byte a pixel, mean, std
    erased = raw.erased  # an erased box crosses as its float32 values: bytes grow with the area erased
    assert len(erased.values) == sum(3 * h * w for _, _, h, w in erased.boxes.tolist())


def test_clean_inputs_of_a_split_finish_to_what_load_gives(tiny_split):
    views = tiny_split.load_views(range(50))
    assert isinstance(views, RawViews) and views.raw.dtype == torch.uint8
    assert torch.equal(views.to("cpu"), tiny_split.load(range(50)))


@pytest.fixture(scope="module")
def tiny_split():
    from pipeline.config import DataConfig
    from pipeline.data import load_split

    return load_split(DataConfig(name="digits", test_size=100), "test")


def test_a_run_trained_with_views_finished_on_the_host_has_the_same_weights(tiny_project, monkeypatch, tmp_path):
    """The device-side finish changes where the work happens, never what is trained on."""
    from pipeline.augment import views as views_module
    from safetensors.torch import load_file
    from tests.helpers import TINY, run_bkd

    args = ["train-student", *TINY, "--epochs", "1", "--distill", "mixed"]
    run_bkd([*args, "--run-dir", str(tmp_path / "device")], tiny_project)
    real = views_module.ViewAugmenter.raw_views

    def finished_here(self, *a, **k):  # the views finished in the loader: float32 tensors cross
        return real(self, *a, **k).finish()

    monkeypatch.setattr(views_module.ViewAugmenter, "raw_views", finished_here)
    monkeypatch.setattr("pipeline.metrics._clean_inputs", lambda split, rows: split.load(rows))  # evaluation's
    run_bkd([*args, "--run-dir", str(tmp_path / "host")], tiny_project)
    device, host = (load_file(str(tmp_path / name / "student.safetensors")) for name in ("device", "host"))
    assert device.keys() == host.keys() and all(torch.equal(device[k], host[k]) for k in device)


def test_finish_follows_the_batch_to_its_device():
    aug, images, params = batch(CASES["full recipe"], n=6)
    raw = aug.raw_views(images, params[:, 3], images.flip(0))
    moved = raw._map(lambda t: t.clone())
    assert dataclasses.astuple(moved.erased)[0].data_ptr() != raw.erased.rows.data_ptr()
    if torch.cuda.is_available():
        on_gpu = raw.to("cuda")
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), raw.to("cpu"), rtol=1e-6, atol=1e-5)
