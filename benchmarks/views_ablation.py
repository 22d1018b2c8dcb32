"""Does augmentation-consistent caching pay? The `mixed` student with three kinds of targets.

Run from the repository root, after `bkd train-teacher` (it reuses models/teacher.safetensors)::

    python -m benchmarks.views_ablation [--seeds 0 1 2] [--views 8] [--epochs E] [--json OUT]

  clean        K = 1: clean inputs, clean-input targets, no augmentation
  online       K = 1, student.augment=online: fresh augmentation every step, clean-input targets
               (the inconsistent pairing that offline caching otherwise forces)
  consistent   K = --views: each epoch one cached view per sample, input rebuilt from its stored
               parameters, that view's targets

Each setting trains the same student for the same epochs from each seed (student init and
sample order); it prints test accuracy mean and spread per setting, and the extraction time
and store size for each K.
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
from pipeline.extract import extract_teacher
from pipeline.targets import store_info
from pipeline.train import train_student

SETTINGS = {
    "clean": (1, "views"),
    "online": (1, "online"),
    "consistent": (None, "views"),  # None: --views
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.views_ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/mnist5k.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=8, help="K for the consistent setting (default: 8)")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)

    results: dict = {"settings": {}, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="bkd-views-") as tmp:
        stores = {}
        for k in sorted({1, args.views}):
            cfg = load_config(args.config, [f"extract.views={k}", f"extract.store={tmp}/k{k}.zarr"])
            started = time.perf_counter()
            extract_teacher(cfg, resolve_device(cfg.teacher.device))
            info = store_info(cfg.extract.store)
            stores[k] = cfg.extract.store
            results["stores"][k] = {
                "extract_seconds": time.perf_counter() - started,
                "bytes_on_disk": info["bytes_on_disk"],
                "bytes_per_sample_view": info["bytes_per_sample_view"],
            }
        for name, (k, policy) in SETTINGS.items():
            k = k or args.views
            accuracies = []
            for seed in args.seeds:
                overrides = [f"extract.views={k}", f"extract.store={stores[k]}", f"student.augment={policy}",
                             f"seed={seed}", "student.distill=mixed"]
                if args.epochs:
                    overrides.append(f"student.epochs={args.epochs}")
                cfg = load_config(args.config, overrides)
                row = train_student(cfg, Path(tmp) / f"{name}-{seed}")
                accuracies.append(row["test_accuracy"])
                print(f"{name} seed {seed}: test accuracy {row['test_accuracy']:.4f}", flush=True)
            results["settings"][name] = {
                "views": k, "policy": policy, "seeds": args.seeds, "test_accuracy": accuracies,
                "mean": statistics.mean(accuracies),
                "stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            }

    print(f"\n{'setting':<12}{'K':>3}  {'test accuracy (mean ± sd over seeds ' + str(args.seeds) + ')'}")
    for name, r in results["settings"].items():
        print(f"{name:<12}{r['views']:>3}  {r['mean'] * 100:.2f} ± {r['stdev'] * 100:.2f}  "
              f"({', '.join(f'{a * 100:.1f}' for a in r['test_accuracy'])})")
    print(f"\n{'K':>3}{'extract s':>11}{'store bytes':>13}{'bytes/sample/view':>19}")
    for k, s in results["stores"].items():
        print(f"{k:>3}{s['extract_seconds']:>11.1f}{s['bytes_on_disk']:>13}{s['bytes_per_sample_view']:>19.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
