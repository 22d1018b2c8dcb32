"""`bkd train-student`: train the SNN student from the cached teacher targets."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import DISTILL_MODES
from stages.common import build_config, config_options, one_line_errors


@click.command("train-student")
@config_options
@click.option("--distill", type=click.Choice(DISTILL_MODES), default=None, help="Override student.distill.")
@click.option("--epochs", type=int, default=None, help="Override student.epochs.")
@click.option("--device", default=None, help="Override student.device (auto, cpu, cuda[:N]).")
@click.option("--run-dir", default=None, help="Checkpoints, history and weights [default: student.out_dir/DISTILL].")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --run-dir.")
@one_line_errors
def main(config_path, overrides, distill, epochs, device, run_dir, resume):
    """Train the spiking student with the configured distillation mode; the teacher never runs."""
    from pipeline.train import train_student

    cfg = build_config(config_path, overrides, **{"student.distill": distill, "student.epochs": epochs,
                                                  "student.device": device})
    run_dir = run_dir or str(Path(cfg.student.out_dir) / cfg.student.distill)
    last = train_student(cfg, run_dir, resume)
    click.echo(f"student [{cfg.student.distill}]: test accuracy {last['test_accuracy']:.4f} -> {run_dir}")


if __name__ == "__main__":
    main()
