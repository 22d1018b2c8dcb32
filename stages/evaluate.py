"""`bkd evaluate`: accuracy and firing rates of a trained student; metrics JSON and plots."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.modes import DISTILL_MODES
from stages.common import build_config, config_options, nonempty, one_line_errors, run_standalone


@click.command("evaluate")
@config_options
@click.option("--distill", type=click.Choice(DISTILL_MODES), default=None, help="Override student.distill.")
@click.option("--run-dir", default=None, help="The student's run directory [default: student.out_dir/DISTILL].")
@click.option("--metrics", default=None, help="Metrics JSON [default: metrics/student-DISTILL.json].")
@click.option("--report", default=None,
              help="Per-layer firing rates and operations JSON [default: reports/student-DISTILL.json].")
@click.option("--plots-dir", default=None, help="Where PNG plots go [default: plots/DISTILL].")
@click.option("--device", default=None, help="Override student.device.")
@click.option("--trust-store-teacher", is_flag=True,
              help="Use the store even though teacher.checkpoint is not here to check the store's teacher against.")
@one_line_errors
def main(config_path, overrides, distill, run_dir, metrics, report, plots_dir, device, trust_store_teacher):
    """Headline metrics of a trained student (top-1/5, firing rate, SOPs, energy; the teacher's
    top-1 from its cached logits, or from its forward for a student.targets=online run) and a per-layer
    report with plots.

    They are scored on the test split, or with data.holdout on the held-out train rows: the metrics
    file's `split` (test or validation) and the printed line say which.

    The model, T and data come from the run folder's config.yaml; a config that contradicts it is refused.
    """
    from pipeline.checkpoint import check_replaceable_json, check_replaceable_png, write_json
    from pipeline.student.evaluate import PLOT_FILES, evaluate_student
    from pipeline.student.models import STUDENTS

    cfg = build_config(config_path, overrides, STUDENTS, **{"student.distill": distill, "student.device": device})
    mode = cfg.student.distill
    run_dir = nonempty(run_dir, "--run-dir") or str(Path(cfg.student.out_dir) / mode)
    metrics = nonempty(metrics, "--metrics") or f"metrics/student-{mode}.json"
    report = nonempty(report, "--report") or f"reports/student-{mode}.json"
    plots_dir = nonempty(plots_dir, "--plots-dir") or f"plots/{mode}"
    for path in (metrics, report):
        check_replaceable_json(path)
    for name in PLOT_FILES:  # refused before the evaluation runs, not after
        check_replaceable_png(Path(plots_dir) / name)
    headline, details = evaluate_student(cfg, run_dir, plots_dir, trust_store_teacher)
    write_json(headline, metrics)
    write_json(details, report)
    split = headline["split"]
    click.echo(f"student [{mode}]: {split} top-1 {headline['top1']:.4f} (teacher {headline['teacher_top1']:.4f}), "
               f"firing rate {headline['firing_rate']:.4f}, {headline['sops_per_sample'] / 1e6:.2f} M SOPs and "
               f"{headline['energy_mj_per_sample']:.4f} mJ per sample"
               + (f"; scored on {details['scored_on']}" if split != "test" else ""))


if __name__ == "__main__":
    run_standalone(main)
