"""`bkd compare`: a student metric across distillation modes, and across DVC experiments (mean ± sd over seeds)."""

from __future__ import annotations

import click

from pipeline import compare
from pipeline.errors import BkdError
from stages.common import nonempty, one_line_errors, run_standalone


@click.command("compare")
@click.option("--metrics-dir", default="metrics", show_default=True,
              help="Where `bkd evaluate` wrote student-MODE.json (the modes of this workspace).")
@click.option("--experiments", is_flag=True,
              help="Compare the DVC experiments of this repository instead (`dvc exp show`), grouping "
                   "experiments that differ only in `seed` into mean ± sd.")
@click.option("--metric", default="top1", show_default=True, help="The headline metric to compare.")
@click.option("--split", type=click.Choice(compare.SPLITS), default=None,
              help="Compare only the runs scored on this split: the test split, or the validation rows of "
                   "data.holdout. Runs scored on different splits are refused without it.")
@click.option("--plot", default=None, help="Write a PNG bar chart here.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the groups as JSON instead of a table (strict JSON: a one-seed sd is null).")
@one_line_errors
def main(metrics_dir, experiments, metric, split, plot, as_json):
    """Print (and plot) a student metric per distillation mode.

    Every value is checked: finite, and in [0, 1] for a fraction (top1, top5, firing_rate, ...).
    Each run is scored on the test split, or on the validation rows data.holdout holds out of the
    train split (the metrics file's `split`); one table holds one split.

    Seeds: queue the same experiment with several seeds, e.g.
    `dvc exp run --queue -S seed=0,1,2 -S student.bkd.blur_ratio=0.15,0.3` then
    `dvc exp run --run-all`, and `bkd compare --experiments` reports mean ± sd per mode.
    """
    if plot is not None:
        from pipeline.checkpoint import check_replaceable_png

        check_replaceable_png(nonempty(plot, "--plot"))  # before any table: a plot it may not write is refused
    if experiments:
        rows, split = compare.one_split(compare.experiment_rows(metric=metric), split, "the DVC experiments")
        groups = compare.group_over_seeds(rows)
        if not groups:
            raise BkdError("no experiment has student metrics yet (`dvc exp show`)")
        title = f"{split} {metric} per mode over DVC experiments (mean ± sd over seeds)"
    else:
        groups = compare.mode_groups(compare.read_mode_metrics(metrics_dir), metric, split, metrics_dir)
        title = f"{groups[0]['split']} {metric} per distillation mode"
    if as_json:
        click.echo(compare.to_json(groups))
    else:
        click.echo(compare.format_table(groups, metric))
    if plot:
        compare.plot_groups(groups, metric, plot, title)


if __name__ == "__main__":
    run_standalone(main)
