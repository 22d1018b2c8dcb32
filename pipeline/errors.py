"""Errors the CLI turns into a one-line message and exit code 2, and the helpers that keep them short."""

import reprlib
from typing import Any

_REPR = reprlib.Repr()  # Python 3.11's Repr takes no arguments: set its limits
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = 8


def clip(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters: error messages never echo huge values."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value: Any, limit: int = 80) -> str:
    """repr(value), abbreviated like reprlib and cut to `limit` characters."""
    return clip(_REPR.repr(value), limit)


class BkdError(Exception):
    """Bad input detected before heavy work: the message is shown to the user as is."""


class ConfigError(BkdError):
    """The experiment config (YAML or a command-line override) is invalid."""


class StoreError(BkdError):
    """A teacher-target store is missing, incomplete, corrupted or built for another run."""


class DataError(BkdError):
    """A dataset's files are missing or not in the expected format."""
