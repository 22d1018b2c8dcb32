"""`bkd compare`: test accuracy across distillation modes, and across DVC experiments (mean ± sd over seeds)."""

from __future__ import annotations

import json

import click

from stages.common import one_line_errors, run_standalone


@click.command("compare")
@click.option("--metrics-dir", default="metrics", show_default=True,
              help="Where `bkd evaluate` wrote student-MODE.json (the modes of this workspace).")
@click.option("--experiments", is_flag=True,
              help="Compare the DVC experiments of this repository instead (`dvc exp show`), grouping "
                   "experiments that differ only in `seed` into mean ± sd.")
@click.option("--metric", default="top1", show_default=True, help="The headline metric to compare.")
@click.option("--plot", default=None, help="Write a PNG bar chart here.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON instead of a table.")
@one_line_errors
def main(metrics_dir, experiments, metric, plot, as_json):
    """Print (and plot) a student metric per distillation mode.

    Seeds: queue the same experiment with several seeds, e.g.
    `dvc exp run --queue -S seed=0,1,2 -S student.bkd.blur_ratio=0.15,0.3` then
    `dvc exp run --run-all`, and `bkd compare --experiments` reports mean ± sd per mode.
    """
    from pipeline import compare

    if experiments:
        groups = compare.group_over_seeds(compare.experiment_rows(metric=metric))
        if not groups:
            raise click.ClickException("no experiment has student metrics yet (`dvc exp show`)")
        title = f"test {metric} per mode over DVC experiments (mean ± sd over seeds)"
    else:
        groups = compare.mode_groups(compare.read_mode_metrics(metrics_dir), metric)
        title = f"test {metric} per distillation mode"
    if as_json:
        click.echo(json.dumps(groups, indent=2, default=str))
    else:
        click.echo(compare.format_table(groups, metric))
    if plot:
        compare.plot_groups(groups, metric, plot, title)


if __name__ == "__main__":
    run_standalone(main)
