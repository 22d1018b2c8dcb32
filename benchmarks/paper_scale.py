"""Paper-scale check: the paper rows' teachers and students at their input sizes, on one device.

Run from the repository root (also as part of `python -m benchmarks --device cuda --quick`)::

    python -m benchmarks.paper_scale [--device cuda|cpu] [--quick | --smoke] [--precision auto]
                                     [--workers 0] [--loader-workers 2] [--json OUT]

Two workloads, each from its paper-row config with the data swapped for photographs
(`benchmarks.photos`: crops of the real photos scikit-learn and scikit-image ship, so nothing is
downloaded) and a seeded random-init teacher (timm `pretrained=False`; accuracy does not matter for
speed):

  sew_resnet18@224       configs/imagenet-sew-resnet18.yaml: timm resnet18 teacher (pre_logits and
                         layer4 cached, top-10 logits), student SEW-ResNet-18 (T = 4, BKD layer4 map
                         to map + WSLD), on 224x224 images in an HDF5 file (1000 classes)
  spikingformer_cml@32   configs/cifar10-spikingformer-4-384.yaml: timm vit_small_patch16_224 teacher
                         at teacher.input_size 224 (bicubic), student Spikingformer-CML 4-384 (T = 4,
                         BKD CML form + WSLD), on 32x32 images in an HDF5 file (10 classes)

The HDF5 files are read lazily, as big datasets are, but cost no JPEG decoding, so extraction and
step time measure the models. Both use K = 1 (view 0, the clean input) so that the three step
settings feed the same inputs. Per workload, in one run:

  extraction     `extract_teacher` samples/s over a bare `teacher_outputs` loop at the same batch
                 and precision (benchmarks.extraction), target >= 0.9
  step time      none / cached mixed / online-teacher mixed student steps, round-robin
                 (benchmarks.step_time.measure); target cached/none <= 1.02 on GPU; online/cached
                 reported for each teacher
  loader         samples/s of the workload's cached reader (images + targets) vs the student's
                 consumption (batch / median cached step)
and once, on a real-JPEG class folder (benchmarks.photos: ImageNet-like photos; benchmarks.loading:
RandomResizedCrop + flip views at 224 from load_size 256), one epoch of the student's loader from the
JPEG files or from the decoded images in the store (`extract.images`), in one process or with
`--loader-workers` worker processes: targets >= 1.8x for 2 workers over one process and >= 3x for
the store over the files; the fastest against SEW-ResNet-18's consumption.

Everything runs as the pipeline runs it (`pipeline.precision`, `pipeline.teacher.fast`, `pipeline.student.fast`, `pipeline.data.data_loader`):
`--precision` (auto = bfloat16 on a CUDA device with native bfloat16, float32 on CPU) is passed as
extract.precision and student.precision, `--workers` as loader.workers; channels_last and compile
stay at the configs' values (auto / off). The bare teacher loop and the step loop prepare the teacher
and the students with the same calls extraction and training make. On CPU the sizes are small: it
checks the script, the GPU figures are the ones that count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data import load_split
from pipeline.precision import resolve_precision
from pipeline.student.train import StudentRun, build_student_run

from benchmarks import extraction, loading, photos, step_time
from benchmarks.common import benchmark_device, load_with_hooks, machine, write_random_teacher

CPU = torch.device("cpu")

EXTRACTION_TARGET = 0.9
STEP_TARGET = 1.02  # cached / none on GPU
LOADER_WORKERS_TARGET = 1.8  # 2 workers / 1 process
STORED_TARGET = 3.0  # decoded-image store / JPEG files, per epoch at the same views


@dataclass(frozen=True)
class Sizes:
    image: int  # side of the ImageNet-sized workload's images (224; smaller only for the smoke test)
    n224: int  # training images of the 224 workload (extraction and steps)
    n32: int  # training images of the 32x32 workload
    extract_batch: int
    sew_batch: int
    spk_batch: int
    steps: int
    warmup: int
    reps: int  # extraction reps (median)
    jpeg_classes: int  # the JPEG class folder of benchmarks.loading: classes x per_class images, K views
    jpeg_per_class: int
    jpeg_views: int


SIZES = {
    ("cuda", "full"): Sizes(224, 8192, 8192, 256, 64, 64, 60, 5, 3, 16, 128, 2),
    ("cuda", "quick"): Sizes(224, 4096, 4096, 256, 64, 64, 20, 3, 2, 8, 64, 2),
    ("cuda", "smoke"): Sizes(224, 256, 256, 64, 16, 16, 3, 1, 1, 2, 16, 2),
    # On CPU a SEW-ResNet-18 step at 224 takes seconds: a few steps without warm-up check the script.
    ("cpu", "full"): Sizes(224, 16, 16, 8, 2, 2, 2, 0, 1, 4, 64, 2),
    ("cpu", "quick"): Sizes(224, 8, 8, 8, 2, 2, 1, 0, 1, 4, 16, 2),
    ("cpu", "smoke"): Sizes(64, 8, 8, 8, 2, 2, 1, 0, 1, 2, 4, 1),
}

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {  # the paper-row configs, relative to the repository root
    "sew_resnet18@224": "configs/imagenet-sew-resnet18.yaml",
    "spikingformer_cml@32": "configs/cifar10-spikingformer-4-384.yaml",
}


def workload_config(name: str, tmp: Path, data_root: Path, sizes: Sizes, device: torch.device, precision: str,
                    workers: int | None):
    """The workload's paper-row config on the photo data, its random teacher and store in `tmp`,
    with the precision and worker hooks applied where the schema has them. Returns (cfg, hooks)."""
    batch = sizes.sew_batch if name.startswith("sew") else sizes.spk_batch
    overrides = [
        "data.name=hdf5", f"data.root={data_root}", "data.limit=null",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}", f"teacher.device={device}",
        f"extract.store={tmp / 'targets.zarr'}", "extract.splits=[train]", "extract.views=1",
        f"extract.batch_size={sizes.extract_batch}",
        f"student.device={device}", f"student.batch_size={batch}", f"student.out_dir={tmp / 'runs'}",
    ]
    if name.startswith("spikingformer"):  # K = 1: no mixed views
        overrides += ["augment.mixup=0.0", "augment.mix_views=0", "augment.mix_off_epoch=0"]
    hooks = {"extract.precision": precision, "student.precision": precision}
    if workers is not None:  # else the config's (8 in both paper-row configs)
        hooks["loader.workers"] = workers
    return load_with_hooks(REPO / WORKLOADS[name], overrides, hooks)


def loader_rate(run: StudentRun) -> dict:
    """Samples/s one epoch of a student run's own loader delivers (its sampler's chunk windows and lanes,
    its views), after a first epoch that starts the workers and warms the page cache."""
    seconds = []
    for epoch in range(2):
        run.sampler.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        started = time.perf_counter()
        samples = sum(len(batch[1]) for batch in run.loader)
        seconds.append(time.perf_counter() - started)
    return {"samples": samples, "workers": run.cfg.loader.workers, "batch_size": run.loader.batch_size,
            "first_epoch_s": seconds[0], "epoch_s": seconds[1], "samples_per_s": samples / seconds[1]}


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _consumption(step: dict) -> float:
    """Samples/s the student consumes from the cache: batch over the median cached step."""
    return step["batch_size"] / (step["median_ms"]["cached"] / 1e3)


def run_workload(name: str, tmp: Path, data_root: Path, sizes: Sizes, device: torch.device, precision: str,
                 workers: int | None) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg, hooks = workload_config(name, tmp, data_root, sizes, device, precision, workers)
    write_random_teacher(cfg)
    print(f"\n-- {name}: extraction ({cfg.teacher.model}, batch {cfg.extract.batch_size})")
    ex = extraction.run(cfg, sizes.reps, device)  # leaves the store the steps read
    print(f"-- {name}: student steps ({cfg.student.model}, batch {cfg.student.batch_size})")
    step = step_time.measure(cfg, device, sizes.steps, sizes.warmup, desc=f"{name} step rounds")
    step_time.report(step)
    train = load_split(cfg.data, "train")
    persistent = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, persistent_workers=True))
    reader_rate = loader_rate(build_student_run(persistent, CPU))
    consumed = _consumption(step)
    return {"config": WORKLOADS[name], "hooks": hooks, "teacher_model": cfg.teacher.model,
            "student_model": cfg.student.model, "timesteps": cfg.student.timesteps,
            "image_shape": list(train.image_shape), "extraction": ex, "step_time": step,
            "loader": {"cached_reader": reader_rate, "student_samples_per_s": consumed,
                       "cached_reader/consumption": reader_rate["samples_per_s"] / consumed}}


def jpeg_loader(tmp: Path, sizes: Sizes, consumed: float, workers: int) -> dict:
    """benchmarks.loading on a real-JPEG class folder (ImageNet-like photos, RandomResizedCrop + flip
    views at 224 from load_size 256): one epoch of the student's loader from the JPEG files or from
    the decoded images in the store, in one process or `workers` worker processes; and the fastest
    against `consumed`, the samples/s SEW-ResNet-18 trains at."""
    out = loading.run(tmp, sizes.jpeg_classes, sizes.jpeg_per_class, sizes.jpeg_views, workers)
    out["student_samples_per_s"] = consumed
    out["best/consumption"] = max(out["samples_per_s"].values()) / consumed
    return out


def run(tmp: Path, device: torch.device, size: str = "quick", precision: str = "auto", workers: int | None = None,
        loader_workers: int = 2) -> dict:
    """Every figure of the paper-scale check; `tmp` receives the data, teachers and stores. `workers`:
    loader.workers of extraction and the student steps (default: the configs' on CUDA, 0 on CPU)."""
    sizes = SIZES[(device.type, size)]
    if workers is None and device.type == "cpu":
        workers = 0  # three settings' worker pools would swamp a small CPU machine
    resolve_precision(device, precision, "--precision")  # refuses an unknown name before any work
    started = time.perf_counter()
    data = {"in224": photos.write_hdf5(tmp / "in224", sizes.n224, 16, sizes.image, 1000, seed=0),
            "c32": photos.write_hdf5(tmp / "c32", sizes.n32, 16, 32, 10, seed=1)}
    print(f"photo data: {data['in224']['train']} images at {sizes.image} px, {data['c32']['train']} at 32 px "
          f"({data['in224']['seconds'] + data['c32']['seconds']:.1f} s)")
    workloads = {
        "sew_resnet18@224": run_workload("sew_resnet18@224", tmp / "sew", tmp / "in224", sizes, device, precision,
                                         workers),
        "spikingformer_cml@32": run_workload("spikingformer_cml@32", tmp / "spk", tmp / "c32", sizes, device,
                                             precision, workers),
    }
    print("\n-- JPEG class folder: files vs decoded images in the store, one process vs workers (benchmarks.loading)")
    loader = jpeg_loader(tmp / "loading", sizes, workloads["sew_resnet18@224"]["loader"]["student_samples_per_s"],
                         loader_workers)
    shutil.rmtree(tmp / "loading", ignore_errors=True)
    return {"device": str(device), "machine": machine(), "size": size, "sizes": sizes.__dict__,
            "precision_requested": precision, "workers": workers, "data": data, "workloads": workloads,
            "jpeg_loader": loader, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "seconds": time.perf_counter() - started}


def rows(r: dict) -> list[tuple]:
    """(measure, value, target, met or None, detail) rows for the suite's table. The extraction and
    step-time targets are judged on GPU only: on CPU the section runs the models at toy sizes, where
    fixed costs dominate (the core section judges CPU extraction at MNIST scale). The JPEG loader is
    CPU work and is judged on every device."""
    gpu = r["device"].startswith("cuda")
    out = []
    for name, w in r["workloads"].items():
        ex, st = w["extraction"], w["step_time"]
        ms = st["median_ms"]
        out += [
            (f"{name}: extraction / bare", f"{ex['ratio']:.3f}",
             f">= {EXTRACTION_TARGET}" if gpu else f"({EXTRACTION_TARGET} gpu)",
             ex["ratio"] >= EXTRACTION_TARGET if gpu else None,
             f"{w['teacher_model']} {ex['precision']} batch {ex['batch_size']}, {ex['samples']} samples: "
             f"{_rate(ex['extract_samples_per_s'])} vs {_rate(ex['bare_samples_per_s'])} samples/s"),
            (f"{name}: cached / none step", f"{st['ratios_of_medians']['cached/none']:.3f}",
             f"<= {STEP_TARGET}" if gpu else f"({STEP_TARGET} gpu)",
             st["ratios_of_medians"]["cached/none"] <= STEP_TARGET if gpu else None,
             f"{st['precision']} batch {st['batch_size']}: median {ms['none']:.0f} / {ms['cached']:.0f} ms"),
            (f"{name}: online / cached step", f"{st['ratios_of_medians']['online/cached']:.3f}", "", None,
             f"online {w['teacher_model']}: {ms['online']:.0f} ms"),
            (f"{name}: reader / consumption", f"{w['loader']['cached_reader/consumption']:.1f}x", "", None,
             f"{_rate(w['loader']['cached_reader']['samples_per_s'])} vs "
             f"{_rate(w['loader']['student_samples_per_s'])} samples/s"),
        ]
    jl = r["jpeg_loader"]
    w, rate = jl["workers"], jl["samples_per_s"]
    folder = f"{jl['samples']} JPEGs ~{jl['folder']['mean_width']:.0f}x{jl['folder']['mean_height']:.0f}, K = {jl['views']}"
    out += [
        (f"JPEG loader {w} workers / 1 process", f"{jl['workers/one_process']:.2f}", f">= {LOADER_WORKERS_TARGET}",
         jl["workers/one_process"] >= LOADER_WORKERS_TARGET if w == 2 else None,
         f"{_rate(rate[f'jpeg_{w}'])} vs {_rate(rate['jpeg_1'])} samples/s; {folder}"),
        ("decoded-image store / JPEG, 1 process", f"{jl['stored/jpeg']:.2f}", f">= {STORED_TARGET}",
         jl["stored/jpeg"] >= STORED_TARGET, f"{_rate(rate['stored_1'])} vs {_rate(rate['jpeg_1'])} samples/s per "
                                             f"epoch, same views"),
        (f"decoded-image store / JPEG, {w} workers", f"{jl['stored_workers/jpeg_workers']:.2f}", "", None,
         f"{_rate(rate[f'stored_{w}'])} vs {_rate(rate[f'jpeg_{w}'])} samples/s"),
        ("JPEG-folder loader / consumption", f"{jl['best/consumption']:.1f}x", "", None,
         f"fastest {_rate(max(rate.values()))} vs {_rate(jl['student_samples_per_s'])} samples/s "
         f"(sew_resnet18 consumes)"),
    ]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:k] (default: cpu)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer samples and steps")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script (tests)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--workers", type=int, default=None,
                        help="loader.workers of extraction and the student steps (default: the configs' on cuda, 0 on cpu)")
    parser.add_argument("--loader-workers", type=int, default=2, help="workers of the JPEG loader (default 2)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)
    try:
        device = benchmark_device(args.device)
    except ValueError as exc:  # one line, no usage: the device, not the command line, is the problem
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory(prefix="bkd-paper-") as tmp:
        result = run(Path(tmp), device, size, args.precision, args.workers, args.loader_workers)
    print_rows(rows(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_rows(table: list[tuple]) -> None:
    print(f"\n{'measure':<44}{'value':>9}{'target':>12}{'met':>5}  detail")
    print("-" * 120)
    for name, value, target, ok, detail in table:
        print(f"{name:<44}{value:>9}{target:>12}{'' if ok is None else 'yes' if ok else 'NO':>5}  {detail}")


if __name__ == "__main__":
    main()
