"""The names a config refers to, checked against the registries that define them.

`pipeline.config` checks types and ranges only, so it imports no model, dataset or
augmentation code (those modules import the config, not the other way round). The stages
call `check_names` right after loading a config, before any heavy work. Each side checks the
names it reads: stage one (the teacher stages) never imports the student models, except to
look up the student an SNN teacher (`bkd:<student>`) names.
"""

from __future__ import annotations

from typing import Container

from pipeline.config import SNN_TEACHER_PREFIX, Config
from pipeline.errors import ConfigError


def _known(names) -> str:
    return ", ".join(sorted(names))


def check_names(cfg: Config, students: Container[str] | None = None) -> Config:
    """Refuse a teacher that timm does not know (or a `bkd:<student>` teacher naming no registered
    student), a dataset or augmentation kind that is not registered, and with `students` (the student
    registry, which the student side passes in: the teacher side never reads student.model) a student
    that is not in it."""
    from pipeline.augment import PARAM_NAMES
    from pipeline.sources import DATASETS

    checks = [
        _teacher_check(cfg.teacher.model),
        (cfg.data.name in DATASETS, f"data.name: unknown dataset {cfg.data.name!r:.80} (known: {', '.join(DATASETS)})"),
        (cfg.augment.kind in PARAM_NAMES,
         f"augment.kind: unknown {cfg.augment.kind!r:.80} (known: {', '.join(PARAM_NAMES)})"),
    ]
    if students is not None:
        checks.insert(1, (cfg.student.model in students,
                          f"student.model: unknown student {cfg.student.model!r:.80} (known: {_known(students)})"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def _teacher_check(teacher: str) -> tuple[bool, str]:
    if teacher.startswith(SNN_TEACHER_PREFIX):
        from pipeline.teacher.models import snn_models

        name, students = teacher[len(SNN_TEACHER_PREFIX):], snn_models().STUDENTS
        return name in students, (f"teacher.model: {teacher!r:.80} names no registered student after "
                                  f"'{SNN_TEACHER_PREFIX}' (known: {_known(students)})")
    import timm

    return timm.is_model(teacher), (f"teacher.model: {teacher!r:.80} is not a timm model name "
                                    f"(or {SNN_TEACHER_PREFIX}<student> for an SNN teacher)")
