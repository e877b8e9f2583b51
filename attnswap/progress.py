"""rich progress bars shared by training and evaluation (quiet when not on a terminal is rich's job)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def progress_bar(*extra_fields: str) -> Progress:
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *[TextColumn(f"{f} {{task.fields[{f}]}}") for f in extra_fields],
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return Progress(*cols, console=console, transient=False)
