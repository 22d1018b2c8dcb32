"""The rules across sections, and `validate`, which checks a Config built in code as a loaded one is."""

from __future__ import annotations

from pipeline.config.checks import _check, _check_seed
from pipeline.config.coerce import _build
from pipeline.config.sections import Config


def validate(cfg: Config) -> Config:
    """A checked copy of `cfg`, which is left as it is.

    The copy is built from `cfg`'s values as a loaded file is (types and choices, `_coerce`), then
    each section checks its ranges (`check`), then the rules across sections below. Names of
    datasets, models and augmentations are checked by pipeline.registry.
    """
    return _checked(_build(Config, cfg.to_dict(), ""))


def _checked(cfg: Config) -> Config:
    """`cfg` once its sections' ranges and the rules across sections hold."""
    _check_seed("seed", cfg.seed)
    for section in (cfg.data, cfg.loader, cfg.teacher, cfg.augment, cfg.extract, cfg.student):
        section.check()
    aug, views, online = cfg.augment, cfg.extract.views, cfg.student.augment == "online"
    _check(views == 1 or aug.augments(),
           "extract.views > 1 needs an augmentation (augment.kind is none, and no recipe)")
    _check(0 <= aug.mix_views < views,
           f"augment.mix_views must be in [0, extract.views - 1] (view 0 is the clean input), got {aug.mix_views} "
           f"with extract.views {views}")
    _check(not (aug.mixup > 0 or aug.cutmix > 0) or aug.mix_views >= 1 or online,
           "augment.mixup/cutmix need augment.mix_views >= 1: the mixed views are cached with their teacher targets")
    return cfg
