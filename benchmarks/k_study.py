"""What do K cached views cost against the online teacher? The same student and recipe trained from
K = 1, 2, 4, 8, 16 cached views and from the teacher run every step (student.targets=online).

Run from the repository root, after `bkd train-teacher` (it uses the config's teacher checkpoint)::

    python -m benchmarks.k_study [--config params.yaml] [--ks 1 2 4 8 16] [--seeds 0 1 2]
                                 [--distill mixed] [--epochs E] [--set KEY=VALUE ...]
                                 [--store-dir DIR] [--json OUT] [--plot OUT.png]

Each store holds the training split's K views (view 0 clean, the others drawn with the config's
`augment` recipe); each student trains from it with the seeds given (student init, sample order,
blur masks), and the online reference trains on fresh views of the same recipe every step. Per
setting it reports top-1 (mean ± sd over the seeds; scored on held-out training rows with
--set data.holdout=N, as a choice of K should be), the teacher forward passes (cache: N x K once;
online: N per epoch), the extraction time, the store's bytes and the training wall time, and names
the smallest K whose mean lies within one sd of the online reference. With --store-dir the
stores persist there and a complete one is reused (its extraction time is then the first run's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.config import DISTILL_MODES, load_config
from pipeline.distributed import resolve_device
from pipeline.student.train import train_student
from pipeline.targets import store_info
from pipeline.teacher.extract import extract_teacher

COMMON = ["extract.features=[pre_logits]", "extract.splits=[train]"]  # what bkd/mixed read; train only


def _train(config: str, overrides: list[str], seeds: list[int], run_root: Path, name: str) -> dict:
    accuracy, seconds = [], []
    for seed in seeds:
        cfg = load_config(config, [*overrides, f"seed={seed}"])
        run_dir = run_root / f"{name}-seed{seed}"
        row = train_student(cfg, run_dir)
        history = json.loads((run_dir / "history.json").read_text())
        accuracy.append(row["test_accuracy"])
        seconds.append(sum(r["seconds"] for r in history))
        print(f"{name} seed {seed}: test accuracy {row['test_accuracy']:.4f} ({seconds[-1]:.0f} s)", flush=True)
    return {"seeds": seeds, "test_accuracy": accuracy, "mean": statistics.mean(accuracy),
            "stdev": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "train_seconds": statistics.mean(seconds)}


def smallest_matching_k(results: dict) -> int | None:
    """The smallest K whose mean test accuracy is at least the online mean minus one online sd."""
    online = results["online"]
    floor = online["mean"] - online["stdev"]
    matching = [row["views"] for row in results["cached"] if row["mean"] >= floor]
    return min(matching) if matching else None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.checkpoint import save_png

    ks = [row["views"] for row in results["cached"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.errorbar(ks, [100 * r["mean"] for r in results["cached"]], [100 * r["stdev"] for r in results["cached"]],
                marker="o", capsize=3, label="cached, K views")
    online = results["online"]
    ax.axhline(100 * online["mean"], color="C1", label="online teacher")
    low, high = online["mean"] - online["stdev"], online["mean"] + online["stdev"]
    ax.axhspan(100 * low, 100 * high, color="C1", alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K cached views per training sample")
    ax.set_ylabel(f"{results.get('scored_on', 'test')} top-1 (%)")
    ax.set_title(f"{results['distill']} student, {len(online['seeds'])} seeds (mean ± sd)")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.k_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distill", default="mixed", choices=DISTILL_MODES)
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. the recipe)")
    parser.add_argument("--store-dir", type=Path, default=None, help="keep (and reuse) the stores here")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png")
    args = parser.parse_args(argv)
    if min(args.ks) < 1:
        parser.error("--ks: K must be >= 1")
    base = [*COMMON, *args.overrides, f"student.distill={args.distill}"]
    cfg = load_config(args.config, base)
    epochs = args.epochs or cfg.student.epochs
    base.append(f"student.epochs={epochs}")
    train_epochs = load_config(args.config, base).student.train_epochs()  # with the schedule's cooldown
    scored_on = "validation" if cfg.data.holdout else "test"  # data.holdout: held-out training rows
    results: dict = {"distill": args.distill, "epochs": epochs, "overrides": args.overrides, "scored_on": scored_on,
                     "cached": []}

    with tempfile.TemporaryDirectory(prefix="bkd-k-") as scratch:
        stores = args.store_dir or Path(scratch)
        for k in sorted(set(args.ks)):
            store = [f"extract.views={k}", f"extract.store={stores}/k{k}.zarr"]
            cfg = load_config(args.config, [*base, *store])
            started = time.perf_counter()
            extract_teacher(cfg, resolve_device(cfg.teacher.device))
            extract_seconds = time.perf_counter() - started
            info = store_info(cfg.extract.store)
            samples = info["splits"]["train"]["samples"]
            row = _train(args.config, [*base, *store], args.seeds, Path(scratch), f"k{k}")
            results["cached"].append({"views": k, "teacher_forwards": samples * k, "extract_seconds": extract_seconds,
                                      "store_bytes": info["bytes_on_disk"], **row})
        online = _train(args.config, [*base, "student.targets=online"], args.seeds, Path(scratch), "online")
        results["online"] = {"teacher_forwards": samples * train_epochs, "extract_seconds": 0.0,
                             "store_bytes": 0, **online}
    results["smallest_k_within_one_sd_of_online"] = smallest_matching_k(results)

    print(f"\n{'targets':<10}{scored_on + ' top-1 (mean ± sd)':>30}{'teacher fwd':>13}{'extract s':>11}{'store MB':>10}"
          f"{'train s':>9}")
    rows = [(f"K = {r['views']}", r) for r in results["cached"]] + [("online", results["online"])]
    for name, r in rows:
        print(f"{name:<10}{100 * r['mean']:>21.2f} ± {100 * r['stdev']:.2f}{r['teacher_forwards']:>13}"
              f"{r['extract_seconds']:>11.1f}{r['store_bytes'] / 1e6:>10.1f}{r['train_seconds']:>9.0f}")
    print(f"smallest K within one sd of online: {results['smallest_k_within_one_sd_of_online']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
