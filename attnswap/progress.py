"""rich progress bars shared by training and evaluation.

On a terminal they are rich's live bars. Written to a file (a batch job's log, ``nohup``), rich draws
a bar only when it stops, so a long stage would look stuck: there, each task's line is also printed
every ``ATTNSWAP_PROGRESS_EVERY`` seconds (default 30; 0 prints every update).
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class _Progress(Progress):
    def __init__(self, *columns, every: float | None, **kw):
        super().__init__(*columns, **kw)
        self._every = every
        self._printed: dict = {}

    def _maybe_print(self, task_id) -> None:
        if self._every is None or self.console.is_terminal:
            return
        now = time.monotonic()
        if now - self._printed.setdefault(task_id, now) < self._every and self._every > 0:
            return
        self._printed[task_id] = now
        task = next((t for t in self.tasks if t.id == task_id), None)
        if task is not None and not task.finished:  # the finished bar is drawn by rich when it stops
            self.console.print(self.make_tasks_table([task]))

    def update(self, task_id, **kw) -> None:
        super().update(task_id, **kw)
        self._maybe_print(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)


def progress_bar(*extra_fields: str) -> Progress:
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *[TextColumn(f"{f} {{task.fields[{f}]}}") for f in extra_fields],
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    every = float(os.environ.get("ATTNSWAP_PROGRESS_EVERY", "30"))
    return _Progress(*cols, console=console, transient=False, every=every)
