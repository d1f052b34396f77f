"""Progress display for long loops (training epochs, decoding): a live rich bar on a terminal; without one
(a log file, nohup, CI) a plain line every few seconds, since a bar's redraws would never be seen there."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("cudacnn.progress")
PLAIN_EVERY_S = 5.0


def now() -> float:
    return time.monotonic()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """rich.Progress's add_task/update/advance/remove_task, printed as a log line 'description completed/total
    fields... ETA m:ss': the first update at once (an ETA within seconds of the start), then at most one line
    every `every` seconds."""

    def __init__(self, every: float | None = None, clock=None):
        self.every = PLAIN_EVERY_S if every is None else every
        self.clock = clock or now
        self.tasks: dict[int, dict] = {}
        self.shown = -float("inf")

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, eta_label: str = "ETA", **fields) -> int:
        """`eta_label` names the ETA on the line (the trainer's is the epoch's, beside its run ETA field)."""
        task = len(self.tasks)
        now = self.clock()
        self.tasks[task] = dict(description=description, total=total, completed=0, fields=fields, start=now,
                                eta_label=eta_label)
        return task

    def update(self, task: int, completed: float | None = None, advance: float | None = None, **fields) -> None:
        state = self.tasks[task]
        if completed is not None:
            state["completed"] = completed
        if advance:
            state["completed"] += advance
        state["fields"].update(fields)
        now = self.clock()
        if now - self.shown >= self.every:
            self.shown = now
            log.info("%s", self.line(task, now))

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    def line(self, task: int, now: float | None = None) -> str:
        state = self.tasks[task]
        done, total = state["completed"], state["total"]
        parts = [state["description"], f"{done:,.0f}/{total:,.0f}" if total else f"{done:,.0f}"]
        parts += [str(v) for v in state["fields"].values() if v != ""]
        elapsed = (now if now is not None else self.clock()) - state["start"]
        if total and done and elapsed > 0:
            parts.append(f"{state['eta_label']} {format_duration(elapsed / done * (total - done))}")
        return " ".join(parts)


def is_terminal() -> bool:
    return sys.stdout.isatty()


def make_progress(quiet: bool = False, fields: str = "{task.fields[stats]}"):
    """A rich live bar (redrawn 4 times a second) on a terminal, else a PlainProgress."""
    if not quiet and not is_terminal():
        return PlainProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(fields),
                    TimeRemainingColumn(), disable=quiet, transient=True, refresh_per_second=4)


class _Bar:
    def __init__(self, progress, task: int):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


@contextmanager
def progress_bar(description: str, total: int, unit: str = "", quiet: bool = False) -> Iterator[_Bar]:
    """One task's progress; `.advance(n)` as work completes."""
    with make_progress(quiet, fields="{task.fields[unit]}") as progress:
        task = progress.add_task(description, total=total, unit=unit)
        try:
            yield _Bar(progress, task)
        finally:
            progress.remove_task(task)
