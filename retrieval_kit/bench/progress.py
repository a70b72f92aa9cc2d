"""Progress bars and status lines for long benchmark stages, always on stderr (stdout may carry --json)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
ENABLED = True  # the CLI turns this off with --quiet; tests leave it on (nothing renders off a terminal)


def note(message: str) -> None:
    if ENABLED:
        console.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


@contextmanager
def stage(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """`with stage("scoring", n) as advance: ... advance(batch)` — one transient bar per stage."""
    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, transient=True, disable=not ENABLED)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
