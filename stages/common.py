"""What every stage command shares: config options and one-line errors."""

from __future__ import annotations

import functools
import sys

import click

from pipeline.config import Config, load_config
from pipeline.errors import BkdError

DEFAULT_CONFIG = "configs/mnist5k.yaml"


def config_options(command):
    """Add --config and --set to a command; the callback receives `cfg` built from them."""

    @click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
                  type=click.Path(dir_okay=False), help="YAML experiment config.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set student.lr=0.01 (repeatable).")
    @functools.wraps(command)
    def wrapper(config_path, overrides, **kwargs):
        return command(config_path=config_path, overrides=list(overrides), **kwargs)

    return wrapper


def build_config(config_path: str, overrides: list[str], **options) -> Config:
    """Load the config; options given on the command line (not None) override it."""
    extra = [f"{key}={value}" for key, value in options.items() if value is not None]
    return load_config(config_path, list(overrides) + extra)


def one_line_errors(command):
    """Report bad input as `bkd: error: ...` on stderr with exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BkdError as exc:
            click.echo(f"bkd: error: {exc}", err=True)
            sys.exit(2)

    return wrapper
