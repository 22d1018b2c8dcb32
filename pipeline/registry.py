"""The names a config refers to, checked against the registries that define them.

`pipeline.config` checks types and ranges only, so it imports no model, dataset or
augmentation code (those modules import the config, not the other way round). The stages
call `check_names` right after loading a config, before any heavy work.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.errors import ConfigError


def check_names(cfg: Config) -> Config:
    """Refuse a teacher that timm does not know, an unregistered student, dataset or augmentation kind."""
    import timm

    from pipeline.augment import PARAM_NAMES
    from pipeline.data import DATASETS
    from pipeline.models import STUDENTS

    checks = (
        (timm.is_model(cfg.teacher.model), f"teacher.model: {cfg.teacher.model!r:.80} is not a timm model name"),
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
