"""`load_config`: a YAML file (or the defaults) plus `section.key=value` overrides, to a checked Config."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.coerce import _build
from pipeline.config.rules import _checked
from pipeline.config.sections import Config
from pipeline.config.yamlio import YAMLRefused, _first_line, _read_yaml, _yaml_load
from pipeline.errors import ConfigError
from pipeline.errors import clip as _clip


def _parse_scalar(text: str, assignment: str) -> Any:
    if text == "":
        return ""
    try:
        return _yaml_load(text)
    except YAMLRefused as exc:
        raise ConfigError(f"override '{_clip(assignment)}': {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{_clip(assignment)}': the value is not valid YAML "
                          f"({_first_line(exc)})") from None


def format_override(dotted: str, value: Any) -> str:
    """`dotted=value` for `apply_override` that reads back exactly `value` (JSON is YAML: 'yes' stays a string)."""
    return f"{dotted}={json.dumps(value)}"


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{_clip(assignment)}' must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    keys = [key.strip() for key in dotted.split(".")]
    if not all(keys):
        raise ConfigError(f"override '{_clip(assignment)}': empty key in '{_clip(dotted)}' "
                          "(expected section.key=value)")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{_clip(assignment)}': '{'.'.join(keys[:depth + 1])}' is not a section")
    node[keys[-1]] = _parse_scalar(text, assignment)


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML config (or the built-in defaults when `path` is None), apply overrides, validate.

    A store named by an override without an identity file keeps its identity file beside it
    (`ExtractConfig.identity_path`), never the one the file names for its own store."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    overrides = list(overrides)
    for assignment in overrides:
        apply_override(raw, assignment)
    named = {assignment.split("=", 1)[0].replace(" ", "") for assignment in overrides}
    if "extract.store" in named and "extract.identity" not in named and isinstance(raw.get("extract"), dict):
        raw["extract"]["identity"] = ""  # another store than the file's: its identity file goes beside it
    return _checked(_build(Config, raw, ""))
