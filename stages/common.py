"""What every stage command shares: config options and one-line errors."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from pipeline.config import Config, format_override, load_config
from pipeline.errors import BkdError, clip

DEFAULT_CONFIG = "params.yaml"


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


def build_config(config_path: str, overrides: list[str], students=None, **options) -> Config:
    """Load the config; options given on the command line (not None) override it. The names it uses are
    checked against the registries; `students`: the student registry, passed by the student stages
    (stage one imports no student code, see `pipeline.registry`)."""
    from pipeline.registry import check_names

    extra = [format_override(key, value) for key, value in options.items() if value is not None]
    return store_in_origin(check_names(load_config(config_path, list(overrides) + extra), students))


def store_in_origin(cfg: Config) -> Config:
    """In a DVC temporary experiment workspace, a relative store path names the store of the workspace the
    experiment was queued from (`pipeline.dvcrepo.origin_path`): DVC tracks the identity file, which stays
    in the temporary workspace, never the store, which would otherwise be missing there."""
    import dataclasses

    from pipeline.dvcrepo import origin_path

    store = origin_path(cfg.extract.store)
    if store == cfg.extract.store:
        return cfg
    click.echo(f"store: {cfg.extract.store} of the workspace this DVC experiment was queued from ({store})", err=True)
    extract = dataclasses.replace(cfg.extract, store=store, identity=cfg.extract.identity_path())
    return dataclasses.replace(cfg, extract=extract)


def nonempty(value: str | None, option: str) -> str | None:
    """`value` unless it is an empty or blank path (an unset shell variable), which is refused."""
    if value is not None and not value.strip():
        raise BkdError(f"{option} is empty; name a path")
    return value


def error_line(message: str) -> str:
    """The one line every refusal prints: `bkd: error: MESSAGE`, newlines folded."""
    return "bkd: error: " + " ".join(str(message).split("\n")).strip()


def _os_error_message(exc: OSError) -> str:
    """`strerror: filename` for errors of the environment (read-only directory, full disk, ...)."""
    if not exc.strerror:
        return str(exc) or type(exc).__name__
    message = exc.strerror
    if exc.filename is not None:
        message += f": {exc.filename}"
    if exc.filename2 is not None:
        message += f" -> {exc.filename2}"
    return message


# Set by `--nproc` for the ranks it starts: the folder each rank writes its one-line refusal into (as
# rank<N>), so that the launcher prints the first failing rank's once instead of every rank printing it.
RANK_ERRORS = "BKD_RANK_ERRORS"


def loader_worker_died(exc: BaseException) -> bool:
    """Whether `exc` is torch's report of a DataLoader worker killed or exited under it."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker (pid")


def one_line_errors(command):
    """Report bad input as `bkd: error: ...` on stderr with exit code 2.

    Besides BkdError, the environment's refusals -- OSError (read-only directory, full disk,
    permission denied), MemoryError and a loader worker killed under the run (the OOM killer) --
    are reported the same way: they are not bugs of bkd, and a traceback would hide the one fact
    that matters. Any other exception is a bug
    and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BkdError as exc:
            message = str(exc)
        except OSError as exc:
            message = _os_error_message(exc)
        except MemoryError as exc:
            message = f"out of memory{f' ({exc})' if str(exc) else ''}"
        except RuntimeError as exc:
            if not loader_worker_died(exc):
                raise
            message = (f"a data loader worker process died ({clip(str(exc).splitlines()[0], 120)}): killed from "
                       "outside, often by the out-of-memory killer. Nothing finished is lost: run the same command "
                       "again to continue (train-student and train-teacher with --resume; extract-teacher writes the "
                       "shards still missing); fewer loader.workers need less memory")
        rank_errors = os.environ.get(RANK_ERRORS)
        if rank_errors and "RANK" in os.environ:  # a rank of `--nproc`: the launcher reports it, once
            Path(rank_errors, f"rank{os.environ['RANK']}").write_text(message)
        else:
            click.echo(error_line(message), err=True)
        sys.exit(2)

    return wrapper


def run_click(main, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
    """Run click command or group `main` as the `bkd` CLI: click's usage errors become one line.

    Click's own refusals (unknown option, bad choice, missing argument, value out of range)
    print a multi-line "Usage: ... Try ... Error: ..." block; bkd prints them like every other
    refusal: `bkd: error: MESSAGE` and exit code 2. --help and --version are click's as usual.
    `main` is the click `main` method to call (a bound method, or `super().main`).
    """
    if not standalone_mode:  # the caller handles click's exceptions itself
        return main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
    try:
        rv = main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
    except click.exceptions.NoArgsIsHelpError as exc:  # a bare `bkd`: the help, as click shows it
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        message = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        if isinstance(exc, click.UsageError) and ctx is not None:
            message += f" (see '{ctx.command_path} --help')"
        rank_errors = os.environ.get(RANK_ERRORS)
        if rank_errors and "RANK" in os.environ:  # a rank of `--nproc`: the launcher reports it, once
            Path(rank_errors, f"rank{os.environ['RANK']}").write_text(message)
        else:
            click.echo(error_line(message), err=True)
        sys.exit(2)
    except click.Abort:  # Ctrl-C or end of input at a prompt
        click.echo(error_line("aborted"), err=True)
        sys.exit(1)
    # As in click's standalone mode: an exit code from --help/--version/ctx.exit, else success.
    sys.exit(rv if isinstance(rv, int) else 0)


class OneLineErrorsGroup(click.Group):
    """A click group whose usage errors are one `bkd: error:` line (see `run_click`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        return run_click(super().main, args, prog_name, complete_var, standalone_mode, **extra)


def run_standalone(command) -> None:
    """The `python -m stages.X` entry point (torchrun runs stages that way): errors as in `bkd`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # stages.X under `python -m`
    run_click(command.main, prog_name=f"python -m {spec.name}" if spec is not None else None)
