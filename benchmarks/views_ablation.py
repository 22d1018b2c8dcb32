"""Does augmentation-consistent caching pay? Students trained from cached views, side by side.

Run from the repository root, after `bkd train-teacher` (it reuses the config's teacher checkpoint)::

    python -m benchmarks.views_ablation [--suite views|recipe] [--seeds 0 1 2] [--views 8]
                                        [--epochs E] [--only SETTING ...] [--store-dir DIR] [--json OUT]

With --store-dir the stores persist there and are reused (extraction resumes: a complete store
is not recomputed), so several processes can split the settings (--only) between them.

Suite `views` (the `mixed` student with three kinds of targets):
  clean          K = 1: clean inputs, clean-input targets, no augmentation
  online         K = 1, student.augment=online: fresh augmentation every step, clean-input targets
                 (the inconsistent pairing that offline caching otherwise forces)
  consistent     K = --views: each epoch one cached view per sample, input rebuilt from its stored
                 parameters, that view's targets

Suite `recipe` (the published recipe replayed from the cache):
  crop/none, crop/mixed        K = --views crop-only views (pad-2 crops)
  recipe/none, recipe/mixed    K = --views views with timm's RandAugment rand-m9-n1-mstd0.4-inc1, random
                               erasing 0.25 and mixup 0.5 on the last K/2 views (off after half the
                               epochs), label smoothing 0.1: the Spikingformer-CML recipe
  recipe-fresh/mixed           the same recipe drawn fresh every step (student.augment=online) against
                               the clean input's targets: the inconsistent baseline

Each setting trains the same student for the same epochs from each seed (student init and
sample order); it prints test accuracy mean and spread per setting, and the extraction time
and store size of each store.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.distributed import resolve_device
from pipeline.student.train import train_student
from pipeline.targets import store_info
from pipeline.teacher.extract import extract_teacher

COMMON = ["extract.features=[pre_logits]"]  # what these students read (the layer maps are lasnn's)
RECIPE = ["augment.randaugment=rand-m9-n1-mstd0.4-inc1", "augment.erasing=0.25", "augment.mixup=0.5"]


def suites(views: int, epochs: int) -> dict:
    """{suite: (stores {name: extraction overrides}, settings {name: (store, distill, policy, training overrides)})}."""
    recipe_store = [f"extract.views={views}", *RECIPE, f"augment.mix_views={views // 2}"]
    recipe_training = ["student.label_smoothing=0.1", f"augment.mix_off_epoch={max(1, epochs // 2)}"]
    return {
        "views": ({"k1": ["extract.views=1"], "kK": [f"extract.views={views}"]}, {
            "clean": ("k1", "mixed", "views", []),
            "online": ("k1", "mixed", "online", []),
            "consistent": ("kK", "mixed", "views", []),
        }),
        "recipe": ({"crop": [f"extract.views={views}"], "recipe": recipe_store}, {
            "crop/none": ("crop", "none", "views", []),
            "crop/mixed": ("crop", "mixed", "views", []),
            "recipe/none": ("recipe", "none", "views", recipe_training),
            "recipe/mixed": ("recipe", "mixed", "views", recipe_training),
            "recipe-fresh/mixed": ("recipe", "mixed", "online", recipe_training),
        }),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.views_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--suite", choices=("views", "recipe"), default="views")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=8, help="K of the multi-view stores (default: 8)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's)")
    parser.add_argument("--only", nargs="+", default=None, metavar="SETTING", help="run only these settings")
    parser.add_argument("--store-dir", type=Path, default=None, help="keep (and reuse) the stores here")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)
    epochs = args.epochs or load_config(args.config).student.epochs
    store_overrides, settings = suites(args.views, epochs)[args.suite]
    if args.only:
        unknown = sorted(set(args.only) - set(settings))
        if unknown:
            parser.error(f"--only: unknown setting {unknown[0]} (known: {', '.join(settings)})")
        settings = {name: settings[name] for name in args.only}
        store_overrides = {name: store_overrides[name] for name in {s[0] for s in settings.values()}}

    results: dict = {"suite": args.suite, "settings": {}, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="bkd-views-") as scratch:
        tmp = args.store_dir or scratch
        for name, overrides in store_overrides.items():
            cfg = load_config(args.config, [*overrides, *COMMON, f"extract.store={tmp}/{name}.zarr"])
            started = time.perf_counter()
            extract_teacher(cfg, resolve_device(cfg.teacher.device))
            info = store_info(cfg.extract.store)
            results["stores"][name] = {
                "views": cfg.extract.views,
                "extract_seconds": time.perf_counter() - started,
                "bytes_on_disk": info["bytes_on_disk"],
                "bytes_per_sample_view": info["bytes_per_sample_view"],
            }
        for name, (store, distill, policy, training) in settings.items():
            accuracies = []
            for seed in args.seeds:
                cfg = load_config(args.config, [*store_overrides[store], *COMMON, f"extract.store={tmp}/{store}.zarr",
                                                f"student.augment={policy}", f"seed={seed}",
                                                f"student.distill={distill}", f"student.epochs={epochs}", *training])
                row = train_student(cfg, Path(scratch) / f"{name.replace('/', '-')}-{seed}")
                accuracies.append(row["test_accuracy"])
                print(f"{name} seed {seed}: test accuracy {row['test_accuracy']:.4f}", flush=True)
            results["settings"][name] = {
                "store": store, "distill": distill, "policy": policy, "training": training, "seeds": args.seeds,
                "test_accuracy": accuracies, "mean": statistics.mean(accuracies),
                "stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            }

    print(f"\n{'setting':<20}{'store':>7}  {'test accuracy (mean ± sd over seeds ' + str(args.seeds) + ')'}")
    for name, r in results["settings"].items():
        print(f"{name:<20}{r['store']:>7}  {r['mean'] * 100:.2f} ± {r['stdev'] * 100:.2f}  "
              f"({', '.join(f'{a * 100:.1f}' for a in r['test_accuracy'])})")
    print(f"\n{'store':<8}{'K':>3}{'extract s':>11}{'store bytes':>13}{'bytes/sample/view':>19}")
    for name, s in results["stores"].items():
        print(f"{name:<8}{s['views']:>3}{s['extract_seconds']:>11.1f}{s['bytes_on_disk']:>13}"
              f"{s['bytes_per_sample_view']:>19.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
