"""Progress bars, one helper for every command: `bar` (a rich Progress for training, analysis and prediction, or a
`NoProgress` that does nothing) and `Bars` (one row per task on stderr, for the data tools: conversion, `ccl
check`)."""

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


class NoProgress:
    """The interface of a rich Progress, doing nothing: for runs without a bar (tests, `--quiet`, table runs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass

    def advance(self, *a, **k) -> None:
        pass

    def remove_task(self, *a, **k) -> None:
        pass


def bar(enabled: bool, *, console=None, remaining: bool = False):
    """A transient rich Progress (description, bar, done/total, elapsed; and the time remaining with `remaining`)
    on `console` (rich's default: stdout), or a `NoProgress`."""
    if not enabled:
        return NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = ["[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, *([TimeRemainingColumn()] if remaining else []), transient=True, console=console)
