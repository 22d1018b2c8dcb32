"""Compare students: across the distillation modes of one run, and across DVC experiments.

Accuracy claims at this scale need several seeds, so experiments that differ only in `seed`
are grouped and each mode's metric is reported as mean ± sd over the group. Plots are PNGs
rendered with matplotlib's Agg backend: nothing is fetched, they show offline and in
`dvc plots diff` as plain images.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from pipeline.config import DISTILL_MODES as MODES
from pipeline.config import flatten
from pipeline.errors import BkdError

METRIC_FILE = "metrics/student-{mode}.json"


def read_mode_metrics(metrics_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{mode: headline metrics} of the `student-MODE.json` files in `metrics_dir` (at least one)."""
    found = {}
    for mode in MODES:
        path = Path(metrics_dir) / f"student-{mode}.json"
        if path.is_file():
            try:
                found[mode] = json.loads(path.read_text())
            except ValueError:
                raise BkdError(f"{path}: not a metrics JSON file") from None
            if not isinstance(found[mode], dict):
                raise BkdError(f"{path}: not a metrics JSON file (an object of metrics expected, found a "
                               f"{type(found[mode]).__name__})")
    if not found:
        raise BkdError(f"no student metrics in {metrics_dir} (run `bkd evaluate` or `dvc repro` first)")
    return found


def experiment_rows(repo: str | None = None, metric: str = "top1") -> list[dict[str, Any]]:
    """One row per DVC experiment (and the baseline): its name, params and each mode's `metric`."""
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
        values = {}
        for mode in MODES:
            key = f"{METRIC_FILE.format(mode=mode)}:{metric}"
            value = record.get(key)
            if _number(value):
                values[mode] = float(value)
            prefix = f"{METRIC_FILE.format(mode=mode)}:"
            measured |= {k[len(prefix):] for k, v in record.items() if k.startswith(prefix) and _number(v)}
        if values:
            rows.append({"name": str(name), "rev": record.get("rev"), "params": params, "values": values})
    if not rows and measured:
        raise BkdError(_unknown_metric(metric, measured))
    return rows


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
    """Experiments that differ only in `seed` become one group: per mode n, mean and sd of the values."""
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        params = {k: v for k, v in row["params"].items() if k != "seed"}
        key = json.dumps(params, sort_keys=True, default=str)
        group = groups.setdefault(key, {"params": params, "names": [], "seeds": [], "values": {}})
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


def differing_params(groups: list[dict[str, Any]]) -> list[str]:
    """The parameters whose value differs between groups: what names a group."""
    keys = sorted({k for g in groups for k in g["params"]})
    return [k for k in keys if len({json.dumps(g["params"].get(k), default=str) for g in groups}) > 1]


def group_label(group: dict[str, Any], keys: list[str]) -> str:
    if not keys:
        return "baseline"
    return ", ".join(f"{k.split('.')[-1]}={group['params'].get(k)}" for k in keys)


def format_table(groups: list[dict[str, Any]], metric: str) -> str:
    """A plain-text table: one line per group, `mean ± sd (n)` per mode."""
    keys = differing_params(groups)
    modes = [m for m in MODES if any(m in g["stats"] for g in groups)]
    header = ["experiments (seeds)"] + [f"{m} {metric}" for m in modes]
    lines = []
    for group in groups:
        cells = [f"{group_label(group, keys)} ({len(group['names'])})"]
        for mode in modes:
            s = group["stats"].get(mode)
            if s is None:
                cells.append("-")
            elif s["n"] > 1:
                cells.append(f"{s['mean']:.4f} ± {s['sd']:.4f} ({s['n']})")
            else:
                cells.append(f"{s['mean']:.4f} (1)")
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    render = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(r) for r in lines])


def plot_groups(groups: list[dict[str, Any]], metric: str, path: str | Path, title: str) -> None:
    """Grouped bars: one cluster per mode, one bar per experiment group, error bars = sd over seeds."""
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
        errors = [0.0 if math.isnan(s["sd"]) else s["sd"] for s in stats]
        ax.bar(xs, [s["mean"] for s in stats], width, yerr=errors, capsize=3,
               label=f"{group_label(group, keys)} (n={len(group['names'])})")
    values = [s["mean"] for g in groups for s in g["stats"].values()]
    low = min(values)
    ax.set_ylim(max(0.0, low - 0.05 * max(1e-9, 1 - low) - 0.02), min(1.0, max(values) + 0.02))
    ax.set_xticks(range(len(modes)), modes)
    ax.set(ylabel=f"test {metric}", xlabel="distillation mode", title=title)
    if len(groups) > 1 or keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def mode_groups(metrics: dict[str, dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The modes of one workspace as a single group (for the same table and plot)."""
    measured = {key for m in metrics.values() for key, value in m.items() if _number(value)}
    if metric not in measured:
        raise BkdError(_unknown_metric(metric, measured))
    for mode, m in metrics.items():
        if metric in m and not _number(m[metric]):
            raise BkdError(f"{METRIC_FILE.format(mode=mode).split('/')[-1]}: {metric} is {m[metric]!r}, not a number")
    stats = {mode: {"n": 1, "mean": float(m[metric]), "sd": math.nan} for mode, m in metrics.items() if metric in m}
    return [{"params": {}, "names": ["workspace"], "seeds": [None], "values": {}, "stats": stats}]
