"""The ``mergescale`` command. Each sub-command lives in its own module with a ``register(app)`` function;
none of them holds logic of its own: they parse arguments, call the Python API and print."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from mergescale.errors import MergeScaleError

app = typer.Typer(
    name="mergescale",
    help="Merge large language models at scale: streaming merges, checkpoint averaging, studies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Sub-command modules, in the order `--help` lists them.
_COMMAND_MODULES = ("merge", "pma", "eval", "tasks", "world", "study", "report", "demo")

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"mergescale.cli.{_name}")
    except ModuleNotFoundError as exc:  # a feature not installed in this checkout yet
        if exc.name != f"mergescale.cli.{_name}":
            raise
        continue
    _module.register(app)

err_console = Console(stderr=True)


# Commands whose process may skip the interpreter's teardown once they have succeeded: with torch loaded,
# finalising the interpreter takes about 0.5 s here (measured: `import torch` alone, then exit), a sixth of a
# whole 268M-parameter merge. Their outputs are renamed into place and closed before they return, and they
# start no processes, so nothing at exit remains to be done but flushing the streams.
_FAST_EXIT_COMMANDS = frozenset({"merge", "pma"})


def main() -> None:
    """Entry point: run the app, turning every user-facing error into one red line and exit code 1."""
    try:
        app(standalone_mode=False)
        if len(sys.argv) > 1 and sys.argv[1] in _FAST_EXIT_COMMANDS:
            _exit_now(0)
    except MergeScaleError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing was written to the output folder")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


def _exit_now(code: int) -> None:
    """Flush what was printed and logged, then end the process without the interpreter's teardown."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
