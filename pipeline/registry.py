"""The names a config refers to, checked against the registries that define them.

`pipeline.config` checks types and ranges only, so it imports no model, dataset or
augmentation code (those modules import the config, not the other way round). The stages
call `check_names` right after loading a config, before any heavy work.
"""

from __future__ import annotations

from pipeline.config import SNN_TEACHER_PREFIX, Config
from pipeline.errors import ConfigError


def check_names(cfg: Config) -> Config:
    """Refuse a teacher that timm does not know (or a `bkd:<student>` teacher naming no registered
    student), an unregistered student, dataset or augmentation kind."""
    import timm

    from pipeline.augment import PARAM_NAMES
    from pipeline.data import DATASETS
    from pipeline.models import STUDENTS

    teacher = cfg.teacher.model
    if teacher.startswith(SNN_TEACHER_PREFIX):
        name = teacher[len(SNN_TEACHER_PREFIX):]
        teacher_check = (name in STUDENTS, f"teacher.model: {teacher!r:.80} names no registered student after "
                                           f"'{SNN_TEACHER_PREFIX}' (known: {', '.join(sorted(STUDENTS))})")
    else:
        teacher_check = (timm.is_model(teacher), f"teacher.model: {teacher!r:.80} is not a timm model name "
                                                 f"(or {SNN_TEACHER_PREFIX}<student> for an SNN teacher)")
    checks = (
        teacher_check,
        (cfg.student.model in STUDENTS,
         f"student.model: unknown student {cfg.student.model!r:.80} (known: {', '.join(sorted(STUDENTS))})"),
        (cfg.data.name in DATASETS, f"data.name: unknown dataset {cfg.data.name!r:.80} (known: {', '.join(DATASETS)})"),
        (cfg.augment.kind in PARAM_NAMES,
         f"augment.kind: unknown {cfg.augment.kind!r:.80} (known: {', '.join(PARAM_NAMES)})"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg
