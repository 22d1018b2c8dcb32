"""The benchmark suite: does the offline design pay? Run from the repository root::

    python -m benchmarks [--quick] [--json benchmarks/results.json]

Measures, on this machine, in this run (default config: MNIST-5k, ResNet-18 teacher with random
weights, SEW-ResNet student, T = 4, batch 64):

  1. distillation overhead   median student step: none / mixed from the cache / mixed with the
                             teacher online (benchmarks.step_time), target cached/none <= 1.05
  2. extraction throughput   `extract_teacher` vs a bare teacher forward loop, target >= 0.9
  3. reader throughput       samples/s the streaming reader delivers (shuffled, from a store much
                             larger than its buffer) over samples/s the student consumes, target
                             >= 20x; peak RSS growth while streaming
  4. store size              bytes on disk per sample per view over raw float32 features + logits,
                             target <= 0.55x
  5. amortization            teacher passes S*E*N (online) vs K*N (cached); a sweep of 4 students
                             measured both ways on the first 1,024 digits for 3 epochs, and the
                             full-size default sweep projected from this run's step medians
  (GPU figures are not part of the suite yet: no GPU was available to build and check them.)

It prints a table and writes every figure to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.targets import store_info

from benchmarks import amortization, extraction, reader, step_time
from benchmarks.common import CONFIG, machine, random_teacher_config

TRAINED_STORE = "cache/mnist5k-resnet18.zarr"  # written by `dvc repro` with the trained teacher


def _store_size(info: dict) -> dict:
    features = sum(math.prod(shape) for shape in info["feature_shapes"].values())
    raw = (features + info["num_classes"]) * 4  # float32 features + logits per sample and view
    dtypes = info["dtypes"]
    return {"path": info["path"], "bytes_per_sample_view": info["bytes_per_sample_view"], "raw_float32_bytes": raw,
            "ratio": info["bytes_per_sample_view"] / raw,
            "codec": f"{dtypes['features']} features, {dtypes['logits']} logits, {info['codec']} with checksums"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run, noisier)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"), metavar="OUT",
                        help="where to write the figures (default: benchmarks/results.json)")
    args = parser.parse_args(argv)
    steps, reps, reader_samples, sweep_epochs, sweep_samples = (10, 1, 8192, 1, 256) if args.quick else \
        (40, 2, 65536, 3, 1024)
    started = time.perf_counter()
    results: dict = {"machine": machine(), "config": CONFIG, "quick": args.quick}

    print("== 1. distillation overhead (student step time)")
    step = step_time.main(["--steps", str(steps)])
    results["step_time"] = step
    with tempfile.TemporaryDirectory(prefix="bkd-bench-") as tmp:
        tmp = Path(tmp)
        print("\n== 2. extraction throughput")
        cfg = random_teacher_config(tmp / "extract")
        results["extraction"] = extraction.run(cfg, reps)
        print("\n== 3. reader throughput and memory")
        results["reader"] = reader.run(cfg.extract.store, tmp, reader_samples, step["batch_size"],
                                       cfg.student.shuffle_buffer_chunks)
        consumed = step["batch_size"] / (step["median_ms"]["cached"] / 1e3)
        results["reader"]["student_samples_per_s"] = consumed
        results["reader"]["ratio"] = results["reader"]["samples_per_s"] / consumed
        print("\n== 4. store size")
        results["store_size"] = {"benchmark_store": _store_size(results["extraction"]["store"])}
        if Path(TRAINED_STORE).exists():
            results["store_size"]["trained_teacher_store"] = _store_size(store_info(TRAINED_STORE))
        print("\n== 5. amortization (4-student sweep)")
        results["amortization"] = amortization.run(tmp / "sweep", epochs=sweep_epochs, samples=sweep_samples)
        full = amortization.default_sweep_passes(load_config(CONFIG))
        # A full-size sweep takes ~20 min here; project it from this run's step medians and extraction time.
        steps = full["students"] * full["epochs"] * -(-full["samples"] // step["batch_size"])
        full["projected_cached_s"] = float(np.median(results["extraction"]["extract_s"])) + \
            steps * step["median_ms"]["cached"] / 1e3
        full["projected_online_s"] = steps * step["median_ms"]["online"] / 1e3
        full["projected_online/cached"] = full["projected_online_s"] / full["projected_cached_s"]
        results["amortization"]["default_config"] = full
    results["total_s"] = time.perf_counter() - started
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json} ({results['total_s'] / 60:.1f} min)")
    return results


def print_table(r: dict) -> None:
    st, ex, rd, am = r["step_time"], r["extraction"], r["reader"], r["amortization"]
    size = r["store_size"].get("trained_teacher_store", r["store_size"]["benchmark_store"])
    ms = st["median_ms"]
    rows = [
        ("distillation: cached / none step", f"{st['ratios_of_medians']['cached/none']:.3f}",
         "<= 1.05", st["ratios_of_medians"]["cached/none"] <= 1.05,
         f"median {ms['none']:.0f} / {ms['cached']:.0f} ms"),
        ("distillation: online / cached step", f"{st['ratios_of_medians']['online/cached']:.3f}", "", None,
         f"online {ms['online']:.0f} ms"),
        ("extraction / bare teacher loop", f"{ex['ratio']:.3f}", ">= 0.9", ex["ratio"] >= 0.9,
         f"{ex['extract_samples_per_s']:.0f} vs {ex['bare_samples_per_s']:.0f} samples/s"),
        ("reader / student consumption", f"{rd['ratio']:.0f}x", ">= 20x", rd["ratio"] >= 20,
         f"{rd['samples_per_s']:.0f} vs {rd['student_samples_per_s']:.0f} samples/s"),
        ("reader peak RSS growth", f"{rd['rss_growth_mb']:.0f} MB", "bounded", None,
         f"store {rd['store_mb']:.0f} MB on disk, {rd['decoded_store_mb']:.0f} MB decoded; buffer {rd['buffer_rows']} rows"),
        ("store bytes / raw float32", f"{size['ratio']:.3f}", "<= 0.55", size["ratio"] <= 0.55,
         f"{size['bytes_per_sample_view']:.0f} B per sample-view; {size['codec']}"),
        ("sweep teacher passes online / cached", f"{am['teacher_passes_online'] / am['teacher_passes_cached']:.0f}x",
         "", None, f"S*E*N = {am['students']}*{am['epochs']}*{am['samples']} vs K*N = {am['views']}*{am['samples']}"),
        ("sweep wall clock online / cached", f"{am['online/cached']:.2f}", "", None,
         f"{am['online_sweep_s']:.0f} s vs {am['cached_sweep_s']:.0f} s (incl. {am['extraction_s']:.0f} s extraction)"),
    ]
    m = r["machine"]
    print(f"\nbkd benchmarks on {m['device']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
          f"torch {m['torch_version']}")
    print(f"{'measure':<38}{'value':>10}{'target':>10}{'met':>6}  detail")
    print("-" * 110)
    for name, value, target, ok, detail in rows:
        met = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<38}{value:>10}{target:>10}{met:>6}  {detail}")
    d = am["default_config"]
    print(f"default config, 4-student sweep: {d['teacher_passes_online']} teacher passes online "
          f"(4 x {d['epochs']} epochs x {d['samples']}) vs {d['teacher_passes_cached']} cached "
          f"({d['views']} view x {d['samples']}); projected from the medians above "
          f"{d['projected_online_s'] / 60:.1f} min vs {d['projected_cached_s'] / 60:.1f} min "
          f"(online/cached {d['projected_online/cached']:.2f})")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print("note: the machine was busy during the run; ratios are measured side by side, absolute times are not")


if __name__ == "__main__":
    main()
