"""Raw YAML values to typed sections: each value checked against its field's annotation, one-line errors.

Numbers, booleans, strings, lists, mappings, optional (`X | None`) and union fields, and the choices of a
`Literal` field (refused naming the field and its choices, plus why for a former choice).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal

from pipeline.config.choices import Former
from pipeline.errors import ConfigError
from pipeline.errors import clip as _clip
from pipeline.errors import short as _short


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return "str"
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _NotAChoice(ConfigError):
    """A string of a choices field that is none of its choices: refused as is, also inside a union."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except _NotAChoice:
                raise
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, str):
            return value
        error = _NotAChoice if isinstance(value, str) else ConfigError
        raise error(f"{where} must be one of {', '.join(choices)}, got {_short(value)}")
    if origin is Annotated:
        base, *metadata = typing.get_args(tp)
        try:
            return _coerce(value, base, where)
        except _NotAChoice as exc:
            why = next((m[value] for m in metadata if isinstance(m, Former) and value in m), None)
            if why is None:
                raise
            raise _NotAChoice(f"{exc} ({why})") from None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{where} key {_short(k)}"): _coerce(v, value_tp, f"{where}.{k}")
                for k, v in value.items()}
    if tp is float:
        # YAML reads `1e-3` as a string (YAML 1.1); accept ints and numeric strings.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        if not math.isfinite(number):  # no field means inf or nan; weight_decay .inf stopped training mid-run
            raise ConfigError(f"{where} must be a finite number, got {_short(value)}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {_short(value)}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # YAML keys may be numbers, null, ...
    if unknown:
        prefix = f"{where}." if where else ""
        key = unknown[0] if isinstance(unknown[0], str) else repr(unknown[0])
        # the key clipped shorter than other values: the student section's list of known keys is long
        raise ConfigError(f"unknown config key '{prefix}{_clip(key, 60)}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)

