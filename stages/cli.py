"""The `bkd` command: one subcommand per pipeline stage."""

from __future__ import annotations

import click

from stages import cache, compare, evaluate, extract_teacher, predict, train_student, train_teacher
from stages.common import OneLineErrorsGroup


@click.group(cls=OneLineErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bkd")
def main():
    """Offline Blurred Knowledge Distillation for spiking neural networks.

    Typical use: bkd train-teacher, bkd extract-teacher, bkd train-student, bkd evaluate
    (or `dvc repro`, which runs them all).
    """


main.add_command(train_teacher.main)
main.add_command(extract_teacher.main)
main.add_command(train_student.main)
main.add_command(evaluate.main)
main.add_command(compare.main)
main.add_command(predict.main)
main.add_command(cache.main)

if __name__ == "__main__":
    main()
