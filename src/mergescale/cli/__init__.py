"""The ``mergescale`` command. Each sub-command lives in its own module with a ``register(app)`` function;
none of them holds logic of its own: they parse arguments, call the Python API and print."""

from __future__ import annotations

import importlib
import os
import sys
from typing import NoReturn

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
    """Entry point. Exit codes: 0 done, 1 failure (bad input, unwritable output, ...: one red line), 2 usage
    error (unknown option, missing argument, bad value: one line), 130 interrupted (Ctrl-C)."""
    # The engine runs torch ops from three threads (read, compute, write). With OpenMP's default busy-waiting,
    # those threads and any other load on the machine make each op's thread team spin against the others: a TIES
    # merge measured 37 s instead of 20 s on a loaded 2-core machine. Passive waiting costs nothing measurable when
    # idle. Set for this command's process (and the workers it spawns) only, before torch starts its thread pool;
    # a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        code = app(standalone_mode=False)
    except MergeScaleError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit:
        raise
    except OSError as exc:  # the file system refused something no check foresaw (disk full, I/O error, ...)
        _fail(_os_error(exc), 1)
    except Exception as exc:
        _click_error(exc)
        raise
    # Without standalone mode typer returns the code of an Exit (Ctrl-C becomes Exit(130)); commands return None.
    code = code if isinstance(code, int) else 0
    if code == 130:
        _interrupted()
    if code == 0 and len(sys.argv) > 1 and sys.argv[1] in _FAST_EXIT_COMMANDS:
        _exit_now(0)
    sys.exit(code)


def _fail(message: str, code: int) -> NoReturn:
    """One red line on stderr (a multi-line message is joined), then exit with ``code``."""
    from rich.markup import escape

    line = " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _interrupted() -> NoReturn:
    err_console.print("[bold red]interrupted[/]: no partial output was left in place")
    sys.exit(130)


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _click_classes(name: str) -> tuple[type, ...]:
    """Click's exception class ``name`` as typer raises it: typer >= 0.20 vendors click as ``typer._click``
    (``Abort`` and ``Exit`` live in ``typer.exceptions``), older typer uses the ``click`` package itself. Both
    are looked up, so the CLI stays right whichever typer is installed."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _click_error(exc: Exception) -> None:
    """Exit for click's own exceptions (usage errors: one line, exit 2; bare group: its help, exit 2); return
    for anything else."""
    if isinstance(exc, _click_classes("NoArgsIsHelpError")):
        help_text = exc.format_message()  # type: ignore[attr-defined]
        if help_text.strip():  # typer with rich has printed the help already, leaving this empty
            sys.stderr.write(help_text.rstrip() + "\n")
        sys.exit(2)
    if isinstance(exc, _click_classes("ClickException")):
        message = exc.format_message()  # type: ignore[attr-defined]
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            message += f" (see '{ctx.command_path} --help')"
        _fail(message, int(getattr(exc, "exit_code", 1)))
    if isinstance(exc, _click_classes("Abort")):
        _fail("aborted", 1)
    if isinstance(exc, _click_classes("Exit")):
        sys.exit(int(getattr(exc, "exit_code", 0)))


def _exit_now(code: int) -> None:
    """Flush what was printed and logged, then end the process without the interpreter's teardown."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
