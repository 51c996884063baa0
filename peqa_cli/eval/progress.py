"""Progress bars for evaluation: rich, on stderr, silent when stderr is not a terminal.

stdout is reserved for results a user may pipe (JSON, tables asked for explicitly), so every
bar here is bound to a stderr console.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def stderr_console() -> Console:
    """A console writing to stderr (rich's default console writes to stdout)."""
    return Console(stderr=True)


@contextmanager
def progress_bar(
    description: str, total: int, *, enabled: bool = True, console: Console | None = None
) -> Iterator[Progress]:
    """Yield a started Progress with one task; advance it with ``bar.advance(bar.task_ids[0], n)``.

    Disabled (but still usable) when ``enabled`` is false or the console is not a terminal, so
    logs and CI output are not filled with carriage-return noise.
    """
    console = console or stderr_console()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
    progress.add_task(description, total=total)
    with progress:
        yield progress


def advance(progress: Progress, n: int = 1) -> None:
    """Advance the single task of a bar made by :func:`progress_bar`."""
    progress.advance(progress.task_ids[0], n)
