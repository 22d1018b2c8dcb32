"""`bkd evaluate`: accuracy and firing rates of a trained student; metrics JSON and plots."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import DISTILL_MODES
from stages.common import build_config, config_options, one_line_errors, run_standalone


@click.command("evaluate")
@config_options
@click.option("--distill", type=click.Choice(DISTILL_MODES), default=None, help="Override student.distill.")
@click.option("--run-dir", default=None, help="The student's run directory [default: student.out_dir/DISTILL].")
@click.option("--metrics", default=None, help="Metrics JSON [default: metrics/student-DISTILL.json].")
@click.option("--plots-dir", default=None, help="Where PNG plots go [default: plots/DISTILL].")
@click.option("--device", default=None, help="Override student.device.")
@click.option("--trust-store-teacher", is_flag=True,
              help="Use the store even though teacher.checkpoint is not here to check the store's teacher against.")
@one_line_errors
def main(config_path, overrides, distill, run_dir, metrics, plots_dir, device, trust_store_teacher):
    """Top-1 accuracy of the student (and of the teacher, from its cached logits) and firing rates.

    The model, T and data come from the run folder's config.yaml; a config that contradicts it is refused.
    """
    from pipeline.evaluate import evaluate_student
    from pipeline.train import write_json

    cfg = build_config(config_path, overrides, **{"student.distill": distill, "student.device": device})
    mode = cfg.student.distill
    run_dir = run_dir or str(Path(cfg.student.out_dir) / mode)
    result = evaluate_student(cfg, run_dir, plots_dir or f"plots/{mode}", trust_store_teacher)
    write_json(result, metrics or f"metrics/student-{mode}.json")
    teacher = result["teacher_test_accuracy"]
    click.echo(f"student [{mode}]: test accuracy {result['test_accuracy']:.4f}, "
               f"teacher {teacher:.4f}, mean firing rate {result['firing_rate_mean']:.4f}, "
               f"{result['sops_per_sample'] / 1e6:.2f} M SOPs and {result['energy_mj_per_sample']:.4f} mJ per sample")


if __name__ == "__main__":
    run_standalone(main)
