"""`bkd train-teacher`: train the ANN teacher, or adopt a user's own weights."""

from __future__ import annotations

import click

from stages.common import build_config, config_options, nonempty, one_line_errors, run_standalone


@click.command("train-teacher")
@config_options
@click.option("--epochs", type=int, default=None, help="Override teacher.epochs.")
@click.option("--checkpoint", "own_weights", type=click.Path(dir_okay=False), default=None,
              help="Adopt these local weights (safetensors or weights-only torch file) for teacher.model instead of training.")
@click.option("--run-dir", default="runs/teacher", show_default=True, help="Training checkpoints and history.")
@click.option("--metrics", default="metrics/teacher.json", show_default=True, help="Metrics JSON to write.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --run-dir.")
@click.option("--overwrite", is_flag=True,
              help="Train again over a finished run of the same config in --run-dir, and replace other weights at "
                   "teacher.checkpoint; without it, both are refused.")
@one_line_errors
def main(config_path, overrides, epochs, own_weights, run_dir, metrics, resume, overwrite):
    """Train the timm teacher on the configured dataset and save it as safetensors."""
    from pipeline.checkpoint import check_replaceable_json, write_json
    from pipeline.teacher.train import adopt_teacher, train_teacher

    cfg = build_config(config_path, overrides, **{"teacher.epochs": epochs})
    run_dir, metrics = nonempty(run_dir, "--run-dir"), nonempty(metrics, "--metrics")
    check_replaceable_json(metrics)
    result = adopt_teacher(cfg, own_weights, overwrite) if own_weights else train_teacher(cfg, run_dir, resume, overwrite)
    write_json(result, metrics)
    click.echo(f"teacher {cfg.teacher.model}: {result['split']} accuracy {result['test_accuracy']:.4f} -> "
               f"{cfg.teacher.checkpoint}")


if __name__ == "__main__":
    run_standalone(main)
