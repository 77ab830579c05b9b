"""Progress bars for long work (rich), quiet when not attached to a terminal unless asked."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


class StepBars:
    """One bar per job, each counting steps; use as a context manager.

    ``update(job, steps_done)`` moves a bar; ``start(names, totals)`` declares the jobs.
    """

    def __init__(self, description: str = "training"):
        self.description = description
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=os.environ.get("RANK", "0") != "0",  # one set of bars under torchrun / accelerate
        )
        self._tasks: list = []

    def __enter__(self) -> StepBars:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self, names: Sequence[str], totals: Sequence[int]) -> None:
        self._tasks = [self._progress.add_task(n, total=t) for n, t in zip(names, totals)]

    def update(self, job: int, steps_done: int) -> None:
        self._progress.update(self._tasks[job], completed=steps_done)
