"""Student training-step time: no distillation vs mixed BKD from the cache vs mixed BKD online.

Run from the repository root::

    python -m benchmarks.step_time [--steps N] [--warmup W] [--batch-size B] [--json OUT]

Three settings on one config (by default the MNIST-5k one: SEW-ResNet student, ResNet-18 teacher;
`measure` takes any config whose store is extracted, on any device), each with its own
identically seeded student, loss and optimizer:

  none    distill=none (cross-entropy), the run `bkd train-student` builds (`build_student_run`),
          its batches from the store's views (no teacher anywhere);
  cached  distill=mixed (CE + BKD + WSLD), the same build: batches from `CachedTargetDataset` over a
          real store (views, label smoothing, the locations it distils);
  online  distill=mixed with student.targets=online, the same build: batches of fresh views from the
          split, and the teacher (eval mode, no_grad, prepared as extraction prepares it) runs on
          every batch, as in the public BKDSNN code.

The store is built in a temporary directory from a randomly initialised teacher (accuracy does
not matter for timing) with the project's own `extract_teacher`. A timed step runs from fetching
the batch out of the DataLoader to the end of `optimizer.step()` (on CUDA, to the end of the
device's work: the clock is read after torch.cuda.synchronize), so the cached reader's chunk
decoding and the online teacher's forward both count; the step itself is the engine's
(`Trainer.train_step`: forward, loss, backward, optimizer and scheduler step). The settings run round-robin, one step
each per round with the order rotated every round, so machine noise hits all three alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import Config, load_config
from pipeline.data import load_split
from pipeline.rawviews import to_device
from pipeline.student.train import StudentRun, build_student_run
from pipeline.teacher.extract import extract_teacher

from benchmarks.common import CONFIG, random_teacher_config, summarize, synchronize

SETTINGS = ("none", "cached", "online")
LABELS = {
    "none": "none (CE only)",
    "cached": "mixed, from cache",
    "online": "mixed, online teacher",
}
CPU = torch.device("cpu")


@dataclass
class Setting:
    """One student run, built as `bkd train-student` builds it, and the batches it is timed on."""

    name: str
    run: StudentRun
    epoch: int = 0
    step_s: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    _it: object = None

    def __post_init__(self):
        self.device, self.fast = self.run.device, self.run.fast
        self.loader, self.sampler = self.run.loader, self.run.sampler
        self.trainer = self.run.trainer(Path(tempfile.gettempdir()) / "bkd-step-time-unused")
        self.batch_size = self.loader.batch_size

    def next_batch(self) -> tuple:
        if self._it is None:
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.loader.dataset, "set_epoch"):
                self.loader.dataset.set_epoch(self.epoch)
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = None
            return self.next_batch()
        return batch if len(batch[1]) == self.batch_size else self.next_batch()  # every timed step: a full batch

    def step(self, record: bool) -> None:
        """One timed training step: fetch, (teacher), the engine's step (forward, loss, backward, optimizer)."""
        synchronize(self.device)
        start = time.perf_counter()
        batch = to_device(self.next_batch(), self.device)
        loaded = time.perf_counter()
        terms, _, _ = self.trainer.train_step(batch, where=f"in the {self.name} setting")
        synchronize(self.device)
        end = time.perf_counter()
        if record:
            self.step_s.append(end - start)
            self.load_s.append(loaded - start)


def build_store(tmp: Path, batch_size: int) -> Config:
    """A config whose random teacher and train-split store live in `tmp`, both written here."""
    cfg = random_teacher_config(tmp, f"student.batch_size={batch_size}")
    extract_teacher(cfg, CPU)
    return cfg


def make_setting(name: str, cfg: Config, device: torch.device = CPU, workers: int | None = None) -> Setting:
    """Setting `name` (none, cached, online) on `device`: the run `build_student_run` builds for distill
    none (none) or mixed (cached, online; online with student.targets=online), with `workers` loader
    processes (default loader.workers). Each student is seeded alike."""
    student = {"distill": "none" if name == "none" else "mixed"}
    if name == "online":
        student["targets"] = "online"
    run = build_student_run(dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, **student)), device,
                            workers=workers)
    return Setting(name, run)


def measure(cfg: Config, device: torch.device = CPU, steps: int = 60, warmup: int = 3, workers: int | None = None,
            desc: str = "step-time rounds") -> dict:
    """Median step times of none / cached / online for `cfg`, whose train-split store must exist
    (cfg.extract.store, made by `extract_teacher` with cfg.teacher.checkpoint). The students run at
    student.precision (and compile, neuron_backend), the online teacher as extraction prepares it
    (extract.precision, channels_last, compile); `workers` loader processes (default loader.workers)."""
    scfg = cfg.student
    train = load_split(cfg.data, "train")
    if len(train) < scfg.batch_size:
        raise ValueError(f"{len(train)} training samples are fewer than one batch of {scfg.batch_size}")
    settings = {name: make_setting(name, cfg, device, workers) for name in SETTINGS}
    teacher = settings["online"].run.teacher.fast
    cached = settings["cached"].run.dataset
    load_before = os.getloadavg()
    order = list(SETTINGS)
    for r in tqdm(range(warmup + steps), desc=desc, unit="round", dynamic_ncols=True):
        k = r % len(order)
        for name in order[k:] + order[:k]:  # rotate who goes first
            settings[name].step(record=r >= warmup)
    load_after = os.getloadavg()

    stats = {name: summarize(s.step_s) for name, s in settings.items()}
    loads = {name: summarize(s.load_s) for name, s in settings.items()}

    def ratios(key: str) -> dict[str, float]:
        return {"cached/none": stats["cached"][key] / stats["none"][key],
                "online/cached": stats["online"][key] / stats["cached"][key],
                "online/none": stats["online"][key] / stats["none"][key]}

    return {
        "benchmark": "student_step_time",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "device": str(device),
        "precision": settings["cached"].fast.precision,
        "student_math": settings["cached"].fast.describe(),
        "teacher_math": teacher.describe(),
        "workers": cfg.loader.workers if workers is None else workers,
        "student_model": scfg.model,
        "timesteps": scfg.timesteps,
        "teacher_model": cfg.teacher.model,
        "image_shape": list(train.image_shape),
        "batch_size": scfg.batch_size,
        "steps": steps,
        "warmup": warmup,
        "median_ms": {name: stats[name]["median_ms"] for name in SETTINGS},
        "ratios_of_medians": ratios("median_ms"),
        "ratios_of_means": ratios("mean_ms"),
        "step": stats,
        "load": loads,
        "cached_chunks_decoded": cached.chunks_decoded,
        "loadavg_1min_before": load_before[0],
        "loadavg_1min_after": load_after[0],
    }


def report(result: dict) -> None:
    """Print one measure() result as a table."""
    stats, loads = result["step"], result["load"]
    print()
    print(f"student step time, {result['student_model']} T={result['timesteps']} on {result['device']} "
          f"({result['precision']}), batch {result['batch_size']}, {result['steps']} timed steps per setting "
          f"(+{result['warmup']} warm-up), round-robin; torch {result['torch_version']}, {result['cpu_count']} CPUs, "
          f"{result['num_threads']} threads")
    header = f"{'setting':<24}{'median ms':>11}{'IQR ms':>9}{'q1–q3 ms':>17}{'mean ms':>10}{'load med':>10}{'load mean':>11}"
    print(header)
    print("-" * len(header))
    for name in SETTINGS:
        s, ld = stats[name], loads[name]
        print(f"{LABELS[name]:<24}{s['median_ms']:>11.1f}{s['iqr_ms']:>9.1f}"
              f"{s['q1_ms']:>8.1f}–{s['q3_ms']:<8.1f}{s['mean_ms']:>10.1f}{ld['median_ms']:>10.2f}{ld['mean_ms']:>11.2f}")
    print()
    print(f"{'ratio':<16}{'of medians':>12}{'of means':>10}")
    for key in result["ratios_of_medians"]:
        print(f"{key:<16}{result['ratios_of_medians'][key]:>12.3f}{result['ratios_of_means'][key]:>10.3f}")
    busiest = max(result["loadavg_1min_before"], result["loadavg_1min_after"])
    print(f"(cached reader decoded {result['cached_chunks_decoded']} chunks; 1-min load average "
          f"{result['loadavg_1min_before']:.2f} before, {result['loadavg_1min_after']:.2f} after, "
          f"{result['cpu_count']} CPUs)")
    if busiest > (result["cpu_count"] or 1) and result["num_threads"] > 1 and result["device"] == "cpu":
        print(f"warning: the machine was busy with other work; with {result['num_threads']} intra-op threads the "
              f"steps stall on each other's barriers, so absolute times are inflated (try --threads 1)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per setting (default: 60)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting first (default: 3)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="student batch size (default: the config's, 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave torch's default). On a machine shared with "
                             "other CPU-heavy work, intra-op threads stall each other badly; 1 gives steadier numbers")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or load_config(CONFIG).student.batch_size

    with tempfile.TemporaryDirectory(prefix="bkd-step-time-") as tmp:
        started = time.perf_counter()
        cfg = build_store(Path(tmp), batch_size)
        setup_s = time.perf_counter() - started
        result = measure(cfg, CPU, args.steps, args.warmup)
    result = {**result, "config": CONFIG, "store_build_s": setup_s}
    report(result)
    print(f"(store built in {setup_s:.1f}s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
