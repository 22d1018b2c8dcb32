"""Which embedded configuration shows what distillation does? Candidates scored on a validation split.

Run from the repository root::

    python -m benchmarks.default_choice [--config params.yaml] [--holdout 1000] [--seeds 0 1 2]
                                        [--modes none kd bkd mixed] [--only NAME ...]
                                        [--work-dir DIR] [--json OUT]

Every candidate holds out `--holdout` rows of the training split (data.holdout) and is scored on
them; the test split is never read. Per candidate it trains a teacher on the rest (shared by the
candidates whose data and teacher settings agree), extracts its targets and trains one student per
mode and seed. It reports the teacher's and each mode's validation top-1 (mean ± sd over the
seeds) and the gain of each distillation mode over `none` in units of the larger of their sds: a
default is worth shipping where the teacher leaves room and the gain exceeds 2.

With --work-dir the teachers and stores persist there and are reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from pipeline.config import DISTILL_MODES, load_config
from pipeline.distributed import resolve_device
from pipeline.modes import MODES
from pipeline.student.train import train_student
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.train import train_teacher

# name -> overrides of the config. The levers the KD literature uses to leave a student room to
# learn from its teacher: less data, a narrower student, fewer timesteps.
CANDIDATES = {
    "current": [],
    "data1000": ["data.limit=1000"],
    "data1000-narrow-t2-e30": ["data.limit=1000", "student.model_kwargs.widths=[8,16,32]", "student.timesteps=2",
                               "student.epochs=30"],
    "data300-narrow-t2-e60": ["data.limit=300", "teacher.epochs=40", "student.model_kwargs.widths=[8,16,32]",
                              "student.timesteps=2", "student.epochs=60"],
}
STAGE_ONE = ("data.", "teacher.", "augment.", "extract.")  # what the teacher and store depend on


def _stats(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def gain_in_sds(mode: dict, none: dict) -> float:
    """(mean(mode) - mean(none)) / max(sd(mode), sd(none)); inf where both sds are 0 and the means differ."""
    spread = max(mode["stdev"], none["stdev"])
    diff = mode["mean"] - none["mean"]
    return diff / spread if spread > 0 else (0.0 if diff == 0 else float("inf") * (1 if diff > 0 else -1))


def run_candidate(config: str, name: str, overrides: list[str], holdout: int, seeds: list[int],
                  modes: list[str], work: Path, common: list[str] = ()) -> dict:
    """Teacher (shared by the candidates with the same stage-one overrides), store and students of one
    candidate; `common` are overrides of every candidate."""
    stage_one = sorted(o for o in overrides if o.startswith(STAGE_ONE))
    key = "base" if not stage_one else "-".join(o.split("=", 1)[0].split(".")[-1] + o.split("=", 1)[1]
                                                for o in stage_one).replace("/", "_")
    layerwise = any(MODES[m].layerwise for m in modes)
    base = [*common, *overrides, f"data.holdout={holdout}", f"teacher.checkpoint={work}/{key}/teacher.safetensors",
            f"extract.store={work}/{key}/store.zarr",
            *([] if layerwise else ["extract.features=[pre_logits]"])]
    cfg = load_config(config, base)
    teacher_dir = work / key / "teacher"
    if not (teacher_dir / "history.json").exists() or not Path(cfg.teacher.checkpoint).exists():
        train_teacher(cfg, teacher_dir)
    teacher_acc = json.loads((teacher_dir / "history.json").read_text())[-1]["test_accuracy"]
    extract_teacher(cfg, resolve_device(cfg.teacher.device))  # resumes: a complete store is kept
    result = {"overrides": overrides, "teacher_val_top1": teacher_acc, "modes": {}}
    for mode in modes:
        values = []
        for seed in seeds:
            run = load_config(config, [*base, f"student.distill={mode}", f"seed={seed}"])
            row = train_student(run, work / "students" / f"{name}-{mode}-seed{seed}")
            values.append(row["test_accuracy"])  # the held-out validation rows (data.holdout)
            print(f"{name} {mode} seed {seed}: val top-1 {values[-1]:.4f}", flush=True)
        result["modes"][mode] = _stats(values)
    if "none" in result["modes"]:
        none = result["modes"]["none"]
        result["gain_in_sds"] = {m: gain_in_sds(s, none) for m, s in result["modes"].items() if m != "none"}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.default_choice", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--holdout", type=int, default=1000, help="training rows held out for validation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["none", "kd", "bkd", "mixed"], choices=DISTILL_MODES)
    parser.add_argument("--only", nargs="+", default=None, choices=sorted(CANDIDATES), metavar="NAME")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every candidate")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep (and reuse) teachers and stores here")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)
    if args.holdout < 1:
        parser.error("--holdout must be >= 1: candidates are never scored on the test split")
    results = {"holdout": args.holdout, "seeds": args.seeds, "candidates": {}}
    with tempfile.TemporaryDirectory(prefix="bkd-choice-") as scratch:
        work = args.work_dir or Path(scratch)
        for name in args.only or CANDIDATES:
            results["candidates"][name] = run_candidate(args.config, name, CANDIDATES[name], args.holdout,
                                                        args.seeds, args.modes, work, args.extra)
            if args.json:  # after every candidate, so a long study keeps what it has
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nvalidation top-1 (%), mean ± sd over seeds {args.seeds}; gain of a mode over none in sds")
    print(f"{'candidate':<22}{'teacher':>9}" + "".join(f"{m:>16}" for m in args.modes))
    for name, r in results["candidates"].items():
        cells = "".join(f"{100 * s['mean']:>9.2f} ± {100 * s['stdev']:.2f}" for s in r["modes"].values())
        print(f"{name:<22}{100 * r['teacher_val_top1']:>9.2f}{cells}")
        if "gain_in_sds" in r:
            print(f"{'':<31}" + "".join(f"{'':>16}" if m == "none" else f"{r['gain_in_sds'][m]:>+16.1f}"
                                      for m in args.modes))
    return results


if __name__ == "__main__":
    main()
