"""The small range checks the sections' `check` methods are made of; each raises a one-line ConfigError."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.errors import short as _short

if TYPE_CHECKING:
    from pipeline.config.sections import StudentConfig, TeacherConfig


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_seed(key: str, seed: int) -> None:
    # numpy refuses negative seeds and torch ones of 64 bits or more (with tracebacks, deep inside
    # data loading, augmentation or training)
    _check(0 <= seed < 2**63, f"{key} must be in [0, 2**63), got {_short(seed)}")


def _check_path(key: str, value: str) -> None:
    # An empty path is "." to pathlib: a store there once made --overwrite delete the working
    # directory. Empty or blank usually means an unset shell variable in `--set extract.store=$X`.
    _check(value.strip() != "", f"{key} must be a non-empty path, got {_short(value)}")


def _check_training(section: TeacherConfig | StudentConfig, name: str) -> None:
    """The optimisation fields the teacher and the student sections share."""
    _check(section.epochs >= 1, f"{name}.epochs must be >= 1, got {section.epochs}")
    _check(section.batch_size >= 1, f"{name}.batch_size must be >= 1, got {section.batch_size}")
    _check(0 < section.lr < math.inf, f"{name}.lr must be finite and > 0, got {section.lr}")
    _check(section.weight_decay >= 0, f"{name}.weight_decay must be >= 0")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", section.device) is not None,
           f"{name}.device must be auto, cpu or cuda[:N], got {_short(section.device)}")


def _location_name(value: Any) -> bool:
    """A feature location: a module name as `named_modules` spells it (dotted identifiers and indices)."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", value) is not None

