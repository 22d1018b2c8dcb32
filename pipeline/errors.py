"""Errors the CLI turns into a one-line message and exit code 2."""


class BkdError(Exception):
    """Bad input detected before heavy work: the message is shown to the user as is."""


class ConfigError(BkdError):
    """The experiment config (YAML or a command-line override) is invalid."""


class StoreError(BkdError):
    """A teacher-target store is missing, incomplete, corrupted or built for another run."""


class DataError(BkdError):
    """A dataset's files are missing or not in the expected format."""
