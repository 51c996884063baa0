"""Progress bars on stderr (rich), silent when stderr is not a terminal or PEQA_QUIET is set."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
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

stderr_console = Console(stderr=True)


def enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("PEQA_QUIET")


@contextmanager
def progress_bar(
    description: str,
    total: int | None,
    *,
    show: bool = True,
    console: Console | None = None,
    transient: bool = False,
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, info=None)``; a no-op when progress display is off (``show`` false,
    stderr not a terminal, or ``PEQA_QUIET``), so logs and CI output get no carriage returns."""
    console = console or stderr_console
    if not (show and enabled() and console.is_terminal):
        yield lambda n=1, **_: None
        return
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*cols, console=console, transient=transient) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            prog.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance
