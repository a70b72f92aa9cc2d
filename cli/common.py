"""Shared CLI plumbing: one console, one way to turn a library error into a one-line message and an exit code."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer
from rich.console import Console
from typer.core import TyperGroup

from retrieval_kit.errors import RkitError
from retrieval_kit.paths import check_device, dtype_setting

# Piped output is not wrapped at 80 columns (rich's default without a terminal): ids and paths must stay whole.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One warning line on stderr (bad files skipped under --skip-bad-files, …)."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def guarded(func: Callable) -> Callable:
    """Wrap a command so RkitError (and Ctrl-C) become one line, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            dtype_setting()  # a bad RKIT_DTYPE or --device is refused before any command loads a model
            check_device(kwargs.get("device"))
            return func(*args, **kwargs)
        except RkitError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (BrokenPipeError, OSError) as exc:
            if isinstance(exc, BrokenPipeError):
                sys.exit(0)
            fail(f"{exc.__class__.__name__}: {exc}")

    return wrapper


class OneLineUsageErrors(TyperGroup):
    """The top-level command: a bad flag, a missing argument or an unknown command is one ``error:`` line like
    every other error (typer draws a four-line usage box), pointing at the command's --help."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:  # typer 0.2x parses with a click of its own (the lock pins it); older ones with click itself
            from typer._click.exceptions import ClickException, NoArgsIsHelpError
        except ImportError:
            from click.exceptions import ClickException, NoArgsIsHelpError
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # a typer.Exit comes back as its code
        except NoArgsIsHelpError as exc:  # `rkit` or `rkit bench` alone: the help, as before
            typer.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
            code = exc.exit_code
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            try:
                fail(exc.format_message() + (f" (see {ctx.command_path} --help)" if ctx else ""), exc.exit_code)
            except typer.Exit as failed:
                code = failed.exit_code
        except typer.Abort:
            code = 130
        sys.exit(code if isinstance(code, int) else 0)


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout, nothing else mixed in."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Silence library warnings and progress bars: our own bars and one-line errors are the interface."""
    import logging
    import warnings

    from retrieval_kit.corpus.readers import CorpusWarning

    warnings.filterwarnings("ignore")  # third-party deprecation noise is not the user's business …
    warnings.filterwarnings("default", category=CorpusWarning)  # … rkit's own warnings are
    # transformers is not imported here (~1.5 s): it reads TRANSFORMERS_VERBOSITY and HF_HUB_DISABLE_PROGRESS_BARS
    # (set by rkit_cli.main) when a model loads, and a command that fails on its input never loads one. Already
    # imported (rkit used as a library, tests), it is told directly.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # "EOF marker not found" before our own line on a bad PDF
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
