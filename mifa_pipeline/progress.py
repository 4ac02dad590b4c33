"""Per-stage progress bars (done / total, rate) and the final summary table, with rich.

Bars are drawn only on a terminal (or when asked); logs and CI get one line per finished unit instead.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

STAGE_LABELS = {"identities": "identities", "samples": "samples (planned)", "shards": "shards"}


class BuildProgress:
    def __init__(self, totals: dict[str, int | None], done: dict[str, int], enabled: bool | None = None,
                 console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(),
            console=self.console, disable=not self.enabled, transient=False,
        )
        self._tasks = {
            stage: self._progress.add_task(label, total=totals.get(stage), completed=done.get(stage, 0), rate="")
            for stage, label in STAGE_LABELS.items() if stage in totals
        }

    def __enter__(self) -> "BuildProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def advance(self, stage: str, n: int) -> None:
        if stage not in self._tasks:
            return
        task_id = self._tasks[stage]
        self._progress.advance(task_id, n)
        task = self._progress.tasks[task_id]
        speed = task.speed
        self._progress.update(task_id, rate=f"{speed:.2f}/s" if speed else "")

    def note(self, message: str) -> None:
        """A line shown in every mode (a redone task, a taken-over lock)."""
        self.console.print(message, highlight=False)

    def log(self, message: str) -> None:
        """One line per event when bars are off, so logs still show progress."""
        if not self.enabled:  # (`out`: the plain line, no markup or wrapping, a tenth of `print`'s time)
            self.console.out(message, highlight=False)


def summary_table(stages: dict[str, dict[str, Any]], shards: list[dict[str, Any]], wall_seconds: float,
                  title: str = "mifa build summary") -> Table:
    table = Table(title=title)
    for col in ("stage", "in", "out", "dropped", "seconds (sum over workers)"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in stages.items():
        dropped = ", ".join(f"{r}: {n}" for r, n in s["dropped"].items()) or "-"
        table.add_row(name, str(s["in"]), str(s["out"]), dropped, f"{s['seconds']:.1f}")
    total_bytes = sum(s["bytes"] for s in shards)
    table.caption = (f"{len(shards)} shard(s), {sum(s['nsamples'] for s in shards)} samples, "
                     f"{total_bytes / 1e6:.1f} MB, wall {wall_seconds:.1f} s")
    return table
