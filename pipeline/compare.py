"""Compare students: across the distillation modes of one run, and across DVC experiments.

Accuracy claims at this scale need several seeds, so experiments that differ only in `seed`
are grouped and each mode's metric is reported as mean ± sd over the group. Plots are PNGs
rendered with matplotlib's Agg backend: nothing is fetched, they show offline and in
`dvc plots diff` as plain images.

A metric's value is checked where it is read: finite, and in [0, 1] for a fraction (an accuracy,
a firing rate). Runs scored on different splits (the test split, or data.holdout's validation
rows) are never put in one table.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from pipeline.config import DISTILL_MODES as MODES
from pipeline.config import flatten
from pipeline.errors import BkdError

METRIC_FILE = "metrics/student-{mode}.json"
# What `bkd evaluate` scored: the test split, or the validation rows data.holdout holds out of the
# train split. A metrics file without `split` (written before it was recorded) scored the test split.
SPLITS = ("test", "validation")
FRACTIONS = {"top1", "top5", "best_top1", "teacher_top1", "firing_rate"}
NONNEGATIVE = {"best_epoch", "sops_per_sample", "analog_macs_per_sample", "energy_mj_per_sample", "timesteps",
               "epochs", "train_seconds"}
_FRACTION_NAME = re.compile(r"(?:^|_)(?:top\d+|acc|accuracy|agreement)(?:$|_)")
_NONNEGATIVE_NAME = re.compile(r"(?:^|_)(?:loss|seconds|per_sample)(?:$|_)")


class _Spelled(float):
    """A non-finite JSON number that keeps its spelling in the file (NaN, Infinity, 1e400)."""

    def __new__(cls, text: str):
        value = super().__new__(cls, text)
        value.text = text
        return value


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _Spelled(text)


def is_fraction(metric: str) -> bool:
    """Whether `metric` is a fraction in [0, 1]: an accuracy, an agreement, a firing rate."""
    return metric in FRACTIONS or bool(_FRACTION_NAME.search(metric))


def check_value(value: Any, metric: str, where: str) -> float:
    """`value` of `metric` as a float; refused naming `where`, the metric and the value unless it is a finite
    number in the metric's range (a fraction in [0, 1]; a count, time or loss >= 0)."""
    if not _number(value):
        raise BkdError(f"{where}: {metric} is {value!r}, not a number")
    shown = getattr(value, "text", None) or repr(value)
    shown = shown if len(shown) <= 40 else f"{shown[:20]}…({len(shown)} digits)"
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise BkdError(f"{where}: {metric} is {shown}, not a finite number")
    if is_fraction(metric) and not 0.0 <= number <= 1.0:
        hint = f"; {number:g} % is {number / 100:g}" if 2.0 <= number <= 100.0 else ""
        raise BkdError(f"{where}: {metric} is {shown}, not a fraction in [0, 1]{hint}")
    if (metric in NONNEGATIVE or _NONNEGATIVE_NAME.search(metric)) and number < 0:
        raise BkdError(f"{where}: {metric} is {shown}, not >= 0")
    return number


def check_split(value: Any, where: str) -> str:
    """A metrics file's `split`: test or validation (absent: test)."""
    if value is None:
        return "test"
    if value not in SPLITS:
        raise BkdError(f"{where}: split is {value!r}, not one of {', '.join(SPLITS)}")
    return value


def read_mode_metrics(metrics_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{mode: headline metrics} of the `student-MODE.json` files in `metrics_dir` (at least one)."""
    found = {}
    for mode in MODES:
        path = Path(metrics_dir) / f"student-{mode}.json"
        if path.is_file():
            try:
                found[mode] = json.loads(path.read_text(), parse_float=_parse_float, parse_constant=_Spelled)
            except (ValueError, RecursionError):
                raise BkdError(f"{path}: not a metrics JSON file") from None
            if not isinstance(found[mode], dict):
                raise BkdError(f"{path}: not a metrics JSON file (an object of metrics expected, found a "
                               f"{type(found[mode]).__name__})")
    if not found:
        raise BkdError(f"no student metrics in {metrics_dir} (run `bkd evaluate` or `dvc repro` first)")
    return found


def experiment_rows(repo: str | None = None, metric: str = "top1") -> list[dict[str, Any]]:
    """One row per DVC experiment (and the baseline): its name, params, each mode's `metric` and the split
    each mode was scored on (recorded by `bkd evaluate`; for older metrics, from data.holdout)."""
    import dvc.api

    try:
        records = dvc.api.exp_show(repo=repo)
    except Exception as exc:  # not a DVC repository, no commits, ...
        raise BkdError(f"cannot read DVC experiments: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    names = _param_names(Path(repo or ".") / "params.yaml")
    rows, measured = [], set()  # the numeric metrics the records hold, to name them when `metric` is none
    for record in records:
        if record.get("State") in ("Failed", "Queued", "Running") or record.get("rev") == "workspace":
            continue  # the workspace repeats the commit it sits on (or holds unfinished work)
        name = record.get("Experiment") or record.get("rev") or "workspace"
        # exp_show flattens params and metrics alike, prefixing a name with its file only where two files
        # share it: a key is a parameter where it names one of params.yaml's (top-level `seed` included)
        params = {key.split(":", 1)[-1]: value for key, value in record.items()
                  if (key.startswith("params.yaml:") or ":" not in key) and key.split(":", 1)[-1] in names}
        holdout = params.get("data.holdout")
        scored = "validation" if _number(holdout) and holdout > 0 else "test"
        values, splits = {}, {}
        for mode in MODES:
            prefix = f"{METRIC_FILE.format(mode=mode)}:"
            value = record.get(prefix + metric)
            if value is not None:
                where = f"experiment {name}: {METRIC_FILE.format(mode=mode)}"
                values[mode] = check_value(value, metric, where)
                split = record.get(prefix + "split")
                splits[mode] = scored if split is None else check_split(split, where)
            measured |= {k[len(prefix):] for k, v in record.items() if k.startswith(prefix) and _number(v)}
        if values:
            rows.append({"name": str(name), "rev": record.get("rev"), "params": params, "values": values,
                         "splits": splits})
    if not rows and measured:
        raise BkdError(_unknown_metric(metric, measured))
    return rows


def one_split(rows: list[dict[str, Any]], split: str | None, source: str) -> tuple[list[dict[str, Any]], str]:
    """The rows' values scored on `split`, and that split; without `split`, the rows must all share one.

    Each row's `splits` names the split of each of its `values`; the rows returned keep only the values
    scored on the split, and carry it as `split`. `source` names where the rows come from; a row without
    a name (the modes of one workspace) is named by its modes.
    """
    found: dict[str, list[str]] = {}
    for row in rows:
        for mode in row["values"]:
            runs = found.setdefault(row["splits"][mode], [])
            if (row["name"] or mode) not in runs:
                runs.append(row["name"] or mode)
    if not found:
        return rows, split or "test"
    if split is None and len(found) > 1:
        listed = "; ".join(f"{s}: {', '.join(runs[:3])}{f' and {len(runs) - 3} more' if len(runs) > 3 else ''}"
                           for s, runs in sorted(found.items()))
        raise BkdError(f"{source} were scored on different splits ({listed}): compare one split at a time "
                       f"with --split {' or --split '.join(sorted(found))}")
    split = split or next(iter(found))
    if split not in found:
        raise BkdError(f"none of {source} was scored on the {split} split (only on {', '.join(sorted(found))})")
    kept = []
    for row in rows:
        values = {mode: value for mode, value in row["values"].items() if row["splits"][mode] == split}
        if values:
            kept.append({**row, "values": values, "splits": {mode: split for mode in values}, "split": split})
    return kept, split


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unknown_metric(metric: str, measured: set[str]) -> str:
    return f"--metric {metric!r} is in no student's metrics (they hold: {', '.join(sorted(measured))})"


def _param_names(path: Path) -> set[str]:
    """Every dotted name in the params file, leaves and the sections above them."""
    import yaml

    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BkdError(f"cannot read the DVC parameters {path}: {str(exc).splitlines()[0]}") from None
    parts = [leaf.split(".") for leaf in flatten(tree)]
    return {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}


def group_over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Experiments that differ only in `seed` become one group: per mode n, mean and sd of the values
    (sd is NaN for one value; `to_json` writes it as null)."""
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        params = {k: v for k, v in row["params"].items() if k != "seed"}
        key = json.dumps([params, row.get("split")], sort_keys=True, default=str)
        group = groups.setdefault(key, {"params": params, "split": row.get("split"), "names": [], "seeds": [],
                                        "values": {}})
        group["names"].append(row["name"])
        group["seeds"].append(row["params"].get("seed"))
        for mode, value in row["values"].items():
            group["values"].setdefault(mode, []).append(value)
    out = []
    for group in groups.values():
        stats = {}
        for mode, values in group["values"].items():
            stats[mode] = {"n": len(values), "mean": statistics.fmean(values),
                           "sd": statistics.stdev(values) if len(values) > 1 else math.nan}
        out.append({**group, "stats": stats})
    return out


def to_json(groups: list[dict[str, Any]]) -> str:
    """The groups as strict JSON (RFC 8259: no NaN or Infinity): an undefined sd (one value) is null."""

    def strict(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # a parameter such as `.inf`: named, never a bare NaN/Infinity
        return value

    out = []
    for group in groups:
        stats = {mode: {**s, "sd": None if math.isnan(s["sd"]) else s["sd"]} for mode, s in group["stats"].items()}
        out.append(strict({**group, "stats": stats}))
    return json.dumps(out, indent=2, allow_nan=False, default=str)


def differing_params(groups: list[dict[str, Any]]) -> list[str]:
    """The parameters whose value differs between groups: what names a group."""
    keys = sorted({k for g in groups for k in g["params"]})
    return [k for k in keys if len({json.dumps(g["params"].get(k), default=str) for g in groups}) > 1]


def group_label(group: dict[str, Any], keys: list[str]) -> str:
    if not keys:
        return "baseline"
    return ", ".join(f"{k.split('.')[-1]}={group['params'].get(k)}" for k in keys)


def split_caption(split: str | None) -> str:
    return "validation rows (data.holdout), not the test split" if split == "validation" else "the test split"


def format_table(groups: list[dict[str, Any]], metric: str) -> str:
    """A plain-text table: one line per group, `mean ± sd (n)` per mode (sd `—` for one value), under a line
    naming the split the runs were scored on."""
    keys = differing_params(groups)
    modes = [m for m in MODES if any(m in g["stats"] for g in groups)]
    header = ["experiments (seeds)"] + [f"{m} {metric}" for m in modes]
    lines, single = [], False
    for group in groups:
        cells = [f"{group_label(group, keys)} ({len(group['names'])})"]
        for mode in modes:
            s = group["stats"].get(mode)
            if s is None:
                cells.append("-")
            elif s["n"] > 1:
                cells.append(f"{s['mean']:.4f} ± {s['sd']:.4f} ({s['n']})")
            else:
                cells.append(f"{s['mean']:.4f} ± — (1)")
                single = True
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    render = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    splits = {g.get("split") for g in groups}
    caption = f"{metric} on {split_caption(splits.pop() if len(splits) == 1 else None)}: mean ± sd (n)"
    table = [caption, render(header), render(["-" * w for w in widths])] + [render(r) for r in lines]
    if single:
        table.append("— : one value (n = 1), no sd")
    return "\n".join(table)


def plot_groups(groups: list[dict[str, Any]], metric: str, path: str | Path, title: str) -> None:
    """Grouped bars: one cluster per mode, one bar per experiment group, error bars = sd over seeds
    (none where a mode has one value, which the title says)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.checkpoint import save_png

    keys = differing_params(groups)
    modes = [m for m in MODES if any(m in g["stats"] for g in groups)]
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(modes) * max(1, len(groups)) ** 0.5), 4))
    for i, group in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j, m in enumerate(modes) if m in group["stats"]]
        stats = [group["stats"][m] for m in modes if m in group["stats"]]
        errors = [s["sd"] for s in stats]  # NaN (one value): no error bar, no cap
        ax.bar(xs, [s["mean"] for s in stats], width, yerr=None if all(map(math.isnan, errors)) else errors, capsize=3,
               label=f"{group_label(group, keys)} (n={len(group['names'])})")
    values = [s["mean"] for g in groups for s in g["stats"].values()]
    if is_fraction(metric):
        low = min(values)
        high = max(s["mean"] + (0.0 if math.isnan(s["sd"]) else s["sd"]) for g in groups for s in g["stats"].values())
        ax.set_ylim(max(0.0, low - 0.05 * max(1e-9, 1 - low) - 0.02), min(1.0, high + 0.02))
    ax.set_xticks(range(len(modes)), modes)
    splits = {g.get("split") for g in groups}
    split = splits.pop() if len(splits) == 1 else None
    ax.set(ylabel=f"{split} {metric}" if split else metric, xlabel="distillation mode")
    singles = sum(s["n"] == 1 for g in groups for s in g["stats"].values())
    if singles:
        title += "\n(one seed: no sd, no error bar)" if singles == len(values) else "\n(no error bar: one seed, no sd)"
    ax.set_title(title)
    if len(groups) > 1 or keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def mode_groups(metrics: dict[str, dict[str, Any]], metric: str, split: str | None = None,
                source: str | Path = "metrics") -> list[dict[str, Any]]:
    """The modes of one workspace as a single group (for the same table and plot). `source`: the folder
    the metrics were read from, to name a file; `split`: keep the modes scored on it (see `one_split`)."""
    measured = {key for m in metrics.values() for key, value in m.items() if _number(value)}
    if not any(metric in m for m in metrics.values()):  # present but not a number: named below, with its file
        raise BkdError(_unknown_metric(metric, measured))
    values, splits = {}, {}
    for mode, m in metrics.items():
        if metric in m:
            where = str(Path(source) / f"student-{mode}.json")
            values[mode] = check_value(m[metric], metric, where)
            splits[mode] = check_split(m.get("split"), where)
    (row,), split = one_split([{"name": "", "values": values, "splits": splits}], split,
                              f"the student metrics in {source}")
    stats = {mode: {"n": 1, "mean": value, "sd": math.nan} for mode, value in row["values"].items()}
    return [{"params": {}, "split": split, "names": ["workspace"], "seeds": [None], "values": {}, "stats": stats}]
