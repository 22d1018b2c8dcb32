"""`bkd train-student`: train the SNN student from the cached teacher targets.

`--nproc N` trains with DDP on N local processes by running this same module under torchrun;
multi-node runs call torchrun directly (`torchrun ... -m stages.train_student ...`).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.modes import DISTILL_MODES
from pipeline.errors import BkdError
from stages.common import build_config, config_options, nonempty, one_line_errors, run_standalone


@click.command("train-student")
@config_options
@click.option("--distill", type=click.Choice(DISTILL_MODES), default=None, help="Override student.distill.")
@click.option("--epochs", type=int, default=None, help="Override student.epochs.")
@click.option("--device", default=None, help="Override student.device (auto, cpu, cuda[:N]).")
@click.option("--run-dir", default=None, help="Checkpoints, history and weights [default: student.out_dir/DISTILL].")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --run-dir.")
@click.option("--overwrite", is_flag=True,
              help="Train again over a finished run of the same config in --run-dir (its results are deleted as the "
                   "new run starts); without it, a finished run is refused.")
@click.option("--trust-store-teacher", is_flag=True,
              help="Use the store even though teacher.checkpoint is not here to check the store's teacher against.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="DDP processes on this machine (via torchrun): gloo on CPU, one GPU each with nccl.")
@one_line_errors
def main(config_path, overrides, distill, epochs, device, run_dir, resume, overwrite, trust_store_teacher, nproc):
    """Train the spiking student with the configured distillation mode; the teacher never runs."""
    from pipeline.data import scored_split
    from pipeline.distributed import launched_ranks, split_global_batch  # torch: imported only when run
    from pipeline.student.models import STUDENTS

    cfg = build_config(config_path, overrides, STUDENTS, **{"student.distill": distill, "student.epochs": epochs,
                                                            "student.device": device})
    run_dir = nonempty(run_dir, "--run-dir") or str(Path(cfg.student.out_dir) / cfg.student.distill)
    if nproc > 1:
        from pipeline.rundir import RunFolder

        split_global_batch(cfg.student.batch_size, nproc)  # refused here, before any process starts
        RunFolder(run_dir, cfg, "student", resume, overwrite).check()
        if cfg.student.targets == "online":  # every rank loads the teacher: refuse a missing one once
            from pipeline.targets import teacher_sha

            teacher_sha(cfg)
        args = ["--config", config_path, *[a for o in overrides for a in ("--set", o)], "--run-dir", run_dir]
        args += [a for name, value in (("--distill", distill), ("--epochs", epochs), ("--device", device))
                 if value is not None for a in (name, str(value))]
        args += ["--resume"] * resume + ["--overwrite"] * overwrite + ["--trust-store-teacher"] * trust_store_teacher
        _torchrun(nproc, args)  # rank 0 reports the result
        return

    from pipeline.student.train import train_student

    last = train_student(cfg, run_dir, resume, trust_store_teacher, overwrite)
    if launched_ranks().is_main:
        click.echo(f"student [{cfg.student.distill}]: {scored_split(cfg.data)} accuracy {last['test_accuracy']:.4f} "
                   f"-> {run_dir}")


def _torchrun(nproc: int, args: list[str]) -> None:
    """Run this stage as `torchrun --standalone --nproc-per-node N -m stages.train_student ARGS`."""
    if "WORLD_SIZE" in os.environ:
        raise BkdError("--nproc inside a torchrun launch: torchrun already started the processes")
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from stages.common import RANK_ERRORS

    launch = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", __name__, *args])
    with tempfile.TemporaryDirectory(prefix="bkd-ranks-") as errors:
        os.environ[RANK_ERRORS] = errors
        logging.disable(logging.ERROR)  # torchrun's warnings and failure reports: the one line below says what failed
        try:
            run(launch)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            said = {int(p.name[4:]): p.read_text() for p in Path(errors).glob("rank*")}
            if said:  # a refusal (the same on every rank that met it): once, from the lowest rank that said it
                raise BkdError(said[min(said)]) from None
            raise BkdError(f"DDP training failed: rank {rank} exited with code {failure.exitcode} "
                           f"(its message is above)") from None
        finally:
            os.environ.pop(RANK_ERRORS, None)
            logging.disable(logging.NOTSET)


if __name__ == "__main__":
    run_standalone(main)
