"""Progress bars and status lines for long benchmark stages, always on stderr (stdout may carry --json).

Only rkit's own (rich) bars show: `silence_library_bars()` turns off the tqdm bars that sentence-transformers,
transformers, huggingface_hub, datasets, mteb and bm25s would otherwise print between them.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
ENABLED = True  # the CLI turns this off with --quiet; off a terminal the bars are off anyway (status lines stay)

# read by each library when it is imported (tqdm's TQDM_* overrides reach every tqdm bar: mteb, bm25s, ...)
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def silence_library_bars() -> None:
    """Third-party progress bars off, for libraries imported from now on and for those already imported."""
    os.environ.update(_QUIET_ENV)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def note(message: str) -> None:
    if ENABLED:
        console.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


def _bar(description: str) -> Progress:
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True,
                    disable=not ENABLED or not console.is_terminal)  # off a terminal a bar only prints blank lines


@contextmanager
def stage(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """`with stage("scoring", n) as advance: ... advance(batch)` — one transient bar per stage."""
    with _bar(description) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def counter(description: str) -> Iterator[Callable[[int, int], None]]:
    """A bar fed `(done, total)` as the work reports it (the indexer's progress callback)."""
    with _bar(description) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
