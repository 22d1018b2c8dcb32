"""The benchmark suite: does the offline design pay? Run from the repository root::

    python -m benchmarks [--quick | --smoke] [--device cpu|cuda] [--only SECTION ...] [--json benchmarks/results.json]

Measures, on this machine, in this run (sections core, growth, paper, batches):

core (default config: MNIST-5k, ResNet-18 teacher with random weights, SEW-ResNet student, T = 4,
batch 64, CPU):
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
growth (CPU, benchmarks.growth):
  6. cost growth             extraction time and store size against N and K (least-squares lines,
                             target linear), reader peak RSS against N (target flat)
paper (on --device, benchmarks.paper_scale):
  7. paper scale             ResNet-18 -> SEW-ResNet-18 at 224 and ViT-S (224) -> Spikingformer-CML
                             4-384 at 32: extraction / bare teacher forward (>= 0.9), student steps
                             none / cached / online (cached/none <= 1.02 on GPU), the cached reader vs
                             the student's consumption; a real-JPEG class folder's loader with 2
                             workers (>= 1.8x one process) and from the decoded-image store (>= 3x the
                             files) (benchmarks.loading)
batches (CPU, benchmarks.batches):
  8. batch composition       distinct classes per batch of the student's sampler over class-sorted
                             labels (an ImageNet-sized vector; ImageFolder, HDF5 and DVS HDF5 files),
                             the files' order vs the store's vs i.i.d. (target: within 10 %)

`--device cuda` runs the paper section only (the GPU check; `--only` chooses otherwise); on CPU
that section runs at toy sizes and checks the script. It prints a table and writes every figure
to the JSON file.
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

from benchmarks import amortization, batches, extraction, growth, paper_scale, reader, step_time
from benchmarks.common import CONFIG, benchmark_device, machine, random_teacher_config

SECTIONS = ("core", "growth", "paper", "batches")

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
    size_group = parser.add_mutually_exclusive_group()
    size_group.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run, noisier)")
    size_group.add_argument("--smoke", action="store_true",
                            help="tiny sizes for the growth and paper sections (checks the scripts; the tests use it)")
    parser.add_argument("--device", default="cpu", help="device of the paper section: cpu or cuda[:k] (default: cpu)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)}; default: all on cpu, paper on cuda)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="paper section: extract.precision and student.precision (default auto)")
    parser.add_argument("--workers", type=int, default=None,
                        help="paper section: loader.workers of extraction and the student steps (default: the "
                             "paper configs' on cuda, 0 on cpu)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="where to write the figures (default: benchmarks/results.json for all sections on "
                             "cpu, else benchmarks/results-DEVICE-SECTIONS.json)")
    args = parser.parse_args(argv)
    try:
        device = benchmark_device(args.device)
    except ValueError as exc:  # one line, no usage: the device, not the command line, is the problem
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    sections = args.only or (["paper"] if device.type == "cuda" else list(SECTIONS))
    if args.smoke and "core" in sections:
        parser.error("--smoke sizes exist for the growth and paper sections only (add --only growth paper)")
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.json is None:  # a GPU or partial run does not overwrite the suite's CPU figures
        args.json = Path("benchmarks/results.json") if device.type == "cpu" and sections == list(SECTIONS) else \
            Path(f"benchmarks/results-{device.type}-{'-'.join(sections)}.json")
    started = time.perf_counter()
    results: dict = {"machine": machine(), "config": CONFIG, "quick": args.quick, "size": size,
                     "device": str(device), "sections": sections}
    if "core" in sections:
        results.update(core(args.quick))
    if "growth" in sections:
        print("\n== 6. cost growth (extraction vs N and K, reader memory vs N)")
        with tempfile.TemporaryDirectory(prefix="bkd-bench-growth-") as tmp:
            results["growth"] = growth.run(Path(tmp), size)
        growth.report(results["growth"])
    if "batches" in sections:
        print("\n== 8. batch composition (classes per batch, class-sorted files)")
        results["batches"] = batches.main([])
    if "paper" in sections:
        print(f"\n== 7. paper scale on {device}")
        with tempfile.TemporaryDirectory(prefix="bkd-bench-paper-") as tmp:
            results["paper_scale"] = paper_scale.run(Path(tmp), device, size, args.precision, args.workers)
    results["total_s"] = time.perf_counter() - started
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json} ({results['total_s'] / 60:.1f} min)")
    return results


def core(quick: bool) -> dict:
    """Sections 1-5 on the default MNIST config, CPU."""
    steps, reps, reader_samples, sweep_epochs, sweep_samples = (10, 1, 8192, 1, 256) if quick else \
        (40, 2, 65536, 3, 1024)
    results: dict = {}
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
    return results


def core_rows(r: dict) -> list[tuple]:
    st, ex, rd, am = r["step_time"], r["extraction"], r["reader"], r["amortization"]
    size = r["store_size"].get("trained_teacher_store", r["store_size"]["benchmark_store"])
    ms = st["median_ms"]
    return [
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


def growth_rows(g: dict) -> list[tuple]:
    out = []
    for key, axis in (("extraction_vs_n", "N"), ("extraction_vs_k", "K")):
        s = g[key]
        unit = s["unit"][:-1]
        tf, sf = s["time_fit"], s["size_fit"]
        out += [
            (f"growth: extraction CPU time vs {axis}", f"R2 {tf['r2']:.3f}", "linear", s["time_linear"],
             f"{tf['slope'] * 1e3:.2f} ms/{unit} + {tf['intercept']:.1f} s over {axis} = {s['x']}, "
             f"max residual {tf['max_relative_residual']:.1%} (wall R2 {s['wall_fit']['r2']:.3f})"),
            (f"growth: store size vs {axis}", f"R2 {sf['r2']:.4f}", "linear", s["size_linear"],
             f"{sf['slope']:.0f} B/{unit} + {sf['intercept'] / 1e3:.0f} kB, max residual "
             f"{sf['max_relative_residual']:.2%}"),
        ]
    rr = g["reader_rss"]
    out.append(("growth: reader peak RSS vs N", f"{rr['spread_mb']:.1f} MB", f"flat <{rr['flat_spread_mb']:.0f}",
                rr["flat"], f"spread over N = {rr['samples']}: {[round(v, 1) for v in rr['rss_growth_mb']]} MB, "
                            f"{rr['mb_per_1k_samples']:.3f} MB per 1k samples"))
    return out


def print_table(r: dict) -> None:
    rows = []
    if "step_time" in r:
        rows += core_rows(r)
    if "growth" in r:
        rows += growth_rows(r["growth"])
    if "paper_scale" in r:
        rows += [(f"paper: {name}", *rest) for name, *rest in paper_scale.rows(r["paper_scale"])]
    if "batches" in r:
        rows += batches.rows(r["batches"])
    m = r["machine"]
    print(f"\nbkd benchmarks on {m['device']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
          f"torch {m['torch_version']}; sections {', '.join(r['sections'])} ({r['size']} sizes)")
    print(f"{'measure':<50}{'value':>11}{'target':>12}{'met':>5}  detail")
    print("-" * 130)
    for name, value, target, ok, detail in rows:
        met = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<50}{value:>11}{target:>12}{met:>5}  {detail}")
    if "amortization" in r:
        d = r["amortization"]["default_config"]
        print(f"default config, 4-student sweep: {d['teacher_passes_online']} teacher passes online "
              f"(4 x {d['epochs']} epochs x {d['samples']}) vs {d['teacher_passes_cached']} cached "
              f"({d['views']} view x {d['samples']}); projected from the medians above "
              f"{d['projected_online_s'] / 60:.1f} min vs {d['projected_cached_s'] / 60:.1f} min "
              f"(online/cached {d['projected_online/cached']:.2f})")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print("note: the machine was busy during the run; ratios are measured side by side, absolute times are not")


if __name__ == "__main__":
    main()
