"""How sensitive is BKD to λ, α and τ? One-at-a-time sweeps, as DVC queued experiments from one store.

Run from the root of a bkd DVC workspace with nothing uncommitted (a fresh clone after `make install`;
experiments start from the commit)::

    python -m benchmarks.sensitivity [--seeds 0 1 2] [--blur-ratio 0 0.15 0.3 0.5]
                                     [--alpha 2e-4 2e-3 2e-2] [--temperature 1 2 4]
                                     [--set data.holdout=1000 ...] [--no-run]
                                     [--json OUT] [--plot-dir DIR]

It queues one experiment per seed at the workspace's parameters, and one per seed and swept value
with that one parameter changed (`dvc exp run --queue -S ... -S seed=...`), leaving out those
already finished with the same parameters (so an interrupted or extended sweep resumes), runs the queue
(`dvc exp run --run-all`) and reads every finished experiment back (`dvc exp show`). Each stage
lists the parameters it reads, so an experiment re-runs only the students whose loss reads the
swept parameter; the teacher and the store are made once (by the first experiment, if `--set`
changes the data) and restored from DVC's cache afterwards, and so are the students of a seed that
an earlier experiment already trained (DVC's run cache; their evaluations, whose metrics live in
git rather than in DVC's cache, may re-run: about ten seconds each).

By default every experiment holds out 1,000 training rows and scores on them (data.holdout): the
guidance it prints chooses settings, so it never reads the test split. Per parameter it prints a
table (top-1 mean ± sd over the seeds, per mode that reads it, with `none` for reference) and
draws a plot; --no-run reports on the experiments already there.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import subprocess
import sys
from pathlib import Path

from pipeline.compare import experiment_rows, group_over_seeds
from pipeline.config import flatten, load_config

# parameter -> (short name, the modes whose loss reads it, log-scale axis)
SWEEPS = {
    "student.bkd.blur_ratio": ("λ (blur ratio)", ("bkd", "mixed"), False),
    "student.bkd.alpha": ("α (feature weight)", ("bkd", "mixed", "kdsnn", "lasnn"), True),
    "student.logits.temperature": ("τ (temperature)", ("kd", "wsld", "mixed"), False),
}


def _dvc(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _literal(value):
    """dvc.api.exp_show hands back non-numbers as their Python repr ('False', '[0.08, 1.0]', 'None')."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _same(a, b) -> bool:
    """Equal as parameters: numbers compared as floats (exp show gives seed 1 as 1.0), reprs parsed."""
    a, b = _literal(a), _literal(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _finished(params: dict, want: dict) -> bool:
    """Whether an experiment's parameters (as `dvc exp show` lists them) are exactly `want`."""
    return "seed" in params and all(_same(value, want[key]) for key, value in params.items() if key in want)


def queue(grid: dict[str, list[float]], seeds: list[int], base: list[str], current,
          done: list[dict]) -> tuple[int, int]:
    """Queue the seed baselines first (their students fill the run cache), then each swept value.
    An experiment already finished with the same parameters (`done`: an interrupted or narrower
    sweep, or the committed baseline itself) is not queued again. Returns (queued, skipped)."""
    flat = _flat(current)
    planned = [(None, None, seed) for seed in seeds]
    for param, values in grid.items():
        planned += [(param, value, seed) for value in values if not _same(value, flat[param]) for seed in seeds]
    queued = skipped = 0
    for param, value, seed in planned:
        if any(_finished(params, {**flat, "seed": seed, **({param: value} if param else {})}) for params in done):
            skipped += 1
            continue
        settings = [*base, f"seed={seed}", *([f"{param}={value}"] if param else [])]
        _dvc("exp", "run", "--queue", *(a for s in settings for a in ("-S", s)))
        queued += 1
    return queued, skipped


def _flat(cfg) -> dict:
    """{dotted name: value} of a config, named as params.yaml and `dvc exp show` name them."""
    return flatten(cfg.to_dict())


def tables(grid: dict[str, list[float]], seeds: list[int], current) -> dict:
    """{param: [{value, modes: {mode: {n, mean, sd}}}]} from the finished experiments: the groups
    that differ from the swept config in that parameter alone, over the requested seeds."""
    flat = _flat(current)
    rows, seen = [], set()
    for row in experiment_rows():  # one row per parameter set: an experiment that repeats the committed
        key = json.dumps({k: _literal(v) for k, v in row["params"].items()}, sort_keys=True, default=str)
        if row["params"].get("seed") in seeds and key not in seen:  # baseline is the same run, not another seed
            seen.add(key)
            rows.append(row)
    groups = group_over_seeds(rows)
    out = {}
    for param, values in grid.items():
        short, modes, _ = SWEEPS[param]
        found = []
        for value in values:
            for group in groups:
                params = group["params"]
                if param not in params or not _same(params[param], value):
                    continue
                if all(_same(v, flat[k]) for k, v in params.items() if k not in (param, "seed") and k in flat):
                    seeds_found = sorted(int(_literal(s)) for s in group["seeds"] if s is not None)
                    found.append({"value": value, "seeds": seeds_found,
                                  "modes": {m: group["stats"][m] for m in ("none", *modes) if m in group["stats"]}})
                    break
        out[param] = found
    return out


def guidance(param: str, rows: list[dict]) -> list[str]:
    """Per mode: the best value, and the values whose mean lies within one sd of the best."""
    lines = []
    for mode in SWEEPS[param][1]:
        points = [(r["value"], r["modes"][mode]) for r in rows if mode in r["modes"]]
        if not points:
            continue
        best_value, best = max(points, key=lambda p: p[1]["mean"])
        sd = 0.0 if math.isnan(best["sd"]) else best["sd"]
        close = [v for v, s in points if s["mean"] >= best["mean"] - sd]
        lines.append(f"{mode}: best {SWEEPS[param][0].split()[0]} = {best_value:g} "
                     f"({100 * best['mean']:.2f} ± {100 * sd:.2f}); within one sd: {', '.join(f'{v:g}' for v in close)}")
    return lines


def plot(param: str, rows: list[dict], path: Path, scored_on: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.checkpoint import save_png

    short, modes, log = SWEEPS[param]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, mode in enumerate(modes):
        points = [(r["value"], r["modes"][mode]) for r in rows if mode in r["modes"]]
        if points:
            ax.errorbar([v for v, _ in points], [100 * s["mean"] for _, s in points],
                        [0 if math.isnan(s["sd"]) else 100 * s["sd"] for _, s in points],
                        marker="o", capsize=3, label=mode, color=f"C{i}")
    nones = [r["modes"]["none"] for r in rows if "none" in r["modes"]]
    if nones:
        none = nones[0]
        ax.axhline(100 * none["mean"], color="grey", linestyle="--", label="none (no distillation)")
        if not math.isnan(none["sd"]):
            ax.axhspan(100 * (none["mean"] - none["sd"]), 100 * (none["mean"] + none["sd"]), color="grey", alpha=0.15)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(short)
    ax.set_ylabel(f"{scored_on} top-1 (%)")
    seeds = rows[0]["seeds"] if rows else []
    ax.set_title(f"sensitivity to {short.split()[0]}, {len(seeds)} seeds (mean ± sd)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _strict(value):
    """`value` with every non-finite float (an sd over one seed) as null: strict JSON (RFC 8259)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sensitivity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blur-ratio", type=float, nargs="*", default=[0.0, 0.15, 0.3, 0.5])
    parser.add_argument("--alpha", type=float, nargs="*", default=[2e-4, 2e-3, 2e-2])
    parser.add_argument("--temperature", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    parser.add_argument("--set", dest="base", action="append", default=None, metavar="KEY=VALUE",
                        help="parameters of every experiment (default: data.holdout=1000, scored on validation)")
    parser.add_argument("--no-run", action="store_true", help="only report the experiments already run")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--plot-dir", type=Path, default=None, metavar="DIR")
    args = parser.parse_args(argv)
    base = ["data.holdout=1000"] if args.base is None else args.base
    grid = {"student.bkd.blur_ratio": args.blur_ratio, "student.bkd.alpha": args.alpha,
            "student.logits.temperature": args.temperature}
    grid = {k: v for k, v in grid.items() if v}
    if not Path("dvc.yaml").is_file():
        parser.error("run it from the root of a bkd DVC workspace (no dvc.yaml here)")
    current = load_config("params.yaml", base)  # refuses a bad --set before anything is queued
    scored_on = "validation" if current.data.holdout else "test"
    if not args.no_run:
        queued, skipped = queue(grid, args.seeds, base, current, [row["params"] for row in experiment_rows()])
        print(f"queued {queued} experiments ({skipped} already finished)", flush=True)
        if queued:
            subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--run-all"], check=True)
    results = {"seeds": args.seeds, "base": base, "scored_on": scored_on, "sweeps": tables(grid, args.seeds, current)}
    for param, rows in results["sweeps"].items():
        short, modes, _ = SWEEPS[param]
        shown = ["none", *modes]
        print(f"\n{short}: {scored_on} top-1 (%), mean ± sd over seeds {args.seeds}")
        print(f"{'value':>10}" + "".join(f"{m:>18}" for m in shown))
        for row in rows:
            cells = "".join(f"{100 * row['modes'][m]['mean']:>10.2f} ± {100 * row['modes'][m]['sd']:<5.2f}"
                            if m in row["modes"] else f"{'-':>18}" for m in shown)
            print(f"{row['value']:>10g}{cells}")
        results.setdefault("guidance", {})[param] = guidance(param, rows)
        for line in results["guidance"][param]:
            print(f"  {line}")
        if args.plot_dir:
            args.plot_dir.mkdir(parents=True, exist_ok=True)
            plot(param, rows, args.plot_dir / f"sensitivity-{param.split('.')[-1]}.png", scored_on)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_strict(results), indent=2, default=str, allow_nan=False) + "\n")
    return results


if __name__ == "__main__":
    main()

