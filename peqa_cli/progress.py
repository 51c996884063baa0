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
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; a no-op when progress display is off."""
    if not enabled():
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
    with Progress(*cols, console=stderr_console, transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            prog.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance
