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


# timm's RandAugment spec, section by section as `rand_augment_transform` parses it. timm skips a
# section it cannot split into key and number, and takes an unknown `t<name>` for its default set:
# both would build another policy than the one the store records.
_RANDAUGMENT_SECTION = re.compile(r"(?:(?P<key>mstd|mmax|inc|m|n|p)(?P<value>\d[0-9.]*)|t(?:weights|3aw|3a))")
_RANDAUGMENT_INTEGER = {"mmax", "inc", "m", "n"}


def randaugment_problem(spec: str) -> str | None:
    """Why timm would not build exactly the RandAugment `spec` says, or None."""
    sections = spec.split("-")
    if sections[0] != "rand":
        return "it must start with 'rand'"
    for section in sections[1:]:
        match = _RANDAUGMENT_SECTION.fullmatch(section)
        if match is None:
            return (f"section {_short(section)} is none timm understands (m<int>, n<int>, p<float>, mstd<float>, "
                    "mmax<int>, inc<0|1>, tweights, t3a, t3aw)")
        key, value = match.group("key"), match.group("value")
        try:
            int(value) if key in _RANDAUGMENT_INTEGER else float(value) if key else None
        except ValueError:
            kind = "an integer" if key in _RANDAUGMENT_INTEGER else "a number"
            return f"section {_short(section)}: {value!r} is not {kind}"
    return None
