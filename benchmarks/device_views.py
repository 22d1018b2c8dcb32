"""Where the student loader's host time goes at 224 px, and what crosses to the device, with views
finished on the host (float32, the path before) and finished on the device (uint8 `RawViews`).

    python -m benchmarks.device_views [--samples 256] [--json benchmarks/results-device-views.json]

Per recipe (the ImageNet configs' views, and with timm's recipe on top), on decoded images of the
configs' load size (3 x 256 x 256 uint8, as a store with `extract.images` holds them; random pixels:
the cost of these steps does not depend on the content), in one thread (a loader worker's):
  - host CPU-ms per sample, split by stage: crop/resize + flip, RandAugment, erasing (drawing its
    boxes), normalization, mix, collate (stacking), and the host copy a pinned batch costs (a copy
    of what crosses);
  - bytes per sample that cross to the device;
  - before / after ratios of both. The store read is the same either way and is left out
    (benchmarks.loading and benchmarks.data_path measure it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.augment import ViewAugmenter
from pipeline.config import AugmentConfig

MEAN, STD, SCALE = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]), 1 / 255
RECIPES = {
    "views (imagenet-sew-resnet18)": AugmentConfig(kind="resized_crop_flip", flip=True),
    "views + RandAugment + erasing": AugmentConfig(kind="resized_crop_flip", flip=True,
                                                   randaugment="rand-m9-mstd0.5-inc1", erasing=0.25,
                                                   erasing_mode="pixel"),
    "views + mixup/cutmix (every view)": AugmentConfig(kind="resized_crop_flip", flip=True, mixup=0.8, cutmix=1.0,
                                                       mix_views=1),
}
BATCH = 32


def _time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(cfg: AugmentConfig, samples: int) -> dict:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (samples, 3, 256, 256), dtype=np.uint8))
    aug = ViewAugmenter(cfg, (3, 224, 224), mean=MEAN, std=STD, scale=SCALE, source_shape=(3, 256, 256))
    view = 1 if aug.mixes else 1
    params = aug.draw(np.arange(samples), 2, num_samples=samples)[:, view]
    partners = images.roll(1, 0)
    batches = [(images[s:s + BATCH], params[s:s + BATCH], partners[s:s + BATCH]) for s in range(0, samples, BATCH)]

    def raw_all():
        return [aug.raw_views(i, p, q) for i, p, q in batches]

    raws = raw_all()
    after_s = _time(raw_all) + _time(lambda: [r._map(torch.clone) for r in raws])  # + the pinned copy
    finished = [r.finish() for r in raws]
    before_s = _time(lambda: [aug.raw_views(i, p, q).finish() for i, p, q in batches]) + \
        _time(lambda: [f.clone() for f in finished])
    own = [p[aug.layout["own"]] for p in params.tolist()]

    def geometry():
        for image, p in zip(images, own):
            aug.kind.apply(image, p[aug.layout["base"]])

    stages = {"crop/resize + flip": _time(geometry)}
    if aug.randaugment is not None:
        based = [aug.kind.apply(image, p[aug.layout["base"]]) for image, p in zip(images, own)]
        stages["RandAugment"] = _time(lambda: [aug._randaugment(b, aug._recipe_seed(p)) for b, p in zip(based, own)])
    if aug.erasing is not None:
        stages["erasing boxes (host)"] = _time(lambda: [aug._erased(aug._recipe_seed(p), (3, 224, 224)) for p in own])
    stages["collate (stack)"] = _time(lambda: [torch.stack(list(r.raw)) for r in raws])
    stages["normalization (device after)"] = _time(lambda: [aug.normalize(r.raw) for r in raws])
    if aug.mixes:
        stages["partner views + mix (partners on host, mix on device after)"] = _time(
            lambda: [r.finish() for r in raws]) - stages["normalization (device after)"]
    stages["pinned copy, float32 (before)"] = _time(lambda: [f.clone() for f in finished])
    stages["pinned copy, uint8 (after)"] = _time(lambda: [r._map(torch.clone) for r in raws])
    before_bytes = sum(f.numel() * f.element_size() for f in finished) / samples
    after_bytes = sum(r.nbytes() for r in raws) / samples
    ms = lambda seconds: 1e3 * seconds / samples  # noqa: E731
    return {"host_ms_per_sample": {"before": ms(before_s), "after": ms(after_s), "ratio": after_s / before_s},
            "bytes_per_sample": {"before": before_bytes, "after": after_bytes, "ratio": after_bytes / before_bytes},
            "stages_ms_per_sample": {k: ms(v) for k, v in stages.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_views", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker's share
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
               "samples": args.samples, "recipes": {}}
    for name, cfg in RECIPES.items():
        r = results["recipes"][name] = measure(cfg, args.samples)
        h, b = r["host_ms_per_sample"], r["bytes_per_sample"]
        print(f"{name}: host {h['before']:.2f} -> {h['after']:.2f} ms/sample ({h['ratio']:.2f}x); "
              f"to device {b['before'] / 1024:.0f} -> {b['after'] / 1024:.0f} KiB/sample ({b['ratio']:.2f}x)")
        for stage, value in r["stages_ms_per_sample"].items():
            print(f"    {stage:60s} {value:7.3f} ms/sample")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
