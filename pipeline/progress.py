"""Progress bars on stderr for the data tools (conversion, `ccl check`): one row per task, or nothing."""

from __future__ import annotations


class Bars:
    """A rich progress display on stderr with one row per task, or, disabled, one that does nothing."""

    def __init__(self, enabled: bool, label_width: int = 12):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )  # fmt: skip

            self.bar = Progress(
                TextColumn(f"{{task.description:>{label_width}}}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
            )  # fmt: skip
            self.bar.start()

    def add(self, name: str, total: int):
        return self.bar.add_task(name, total=total) if self.bar else None

    def advance(self, task, n: int) -> None:
        if self.bar and n:
            self.bar.advance(task, n)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None
