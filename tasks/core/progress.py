"""Progress of long steps: a rich bar on an interactive terminal, log lines and a Prefect progress artifact.

Stages report through `Reporter` or `track(...)` and stay unaware of where they run.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import Progress

T = TypeVar("T")
LOG_EVERY_SECONDS = 5.0


def in_task_run() -> bool:
    """Inside a Prefect task run; a process that never imported Prefect (a GPU check, the training child) is not."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import TaskRunContext

    return TaskRunContext.get() is not None


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a task or flow run (its lines reach the UI), else a plain logger."""
    if "prefect" in sys.modules:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() or FlowRunContext.get():
            return get_run_logger()
    return logging.getLogger("prefect.boothflow")


class Reporter:
    """Counts units of work done out of `total` and reports them every few seconds and at the end."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.description, self.done = total, description, 0
        self.log = run_logger()
        self.artifact = None
        if in_task_run() and total > 0:
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(0.0, description=description)
        self.bar = Progress(transient=True, disable=not sys.stderr.isatty())
        self.last = time.monotonic()

    def __enter__(self) -> Reporter:
        self.bar.__enter__()
        self.bar_task = self.bar.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def advance(self, units: int = 1) -> None:
        self.done += units
        self.bar.advance(self.bar_task, units)
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_SECONDS or self.done >= self.total:
            self.last = now
            self.log.info("%s: %d/%d", self.description, self.done, self.total)
            if self.artifact is not None:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact, 100.0 * self.done / self.total)


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Yield `items`, reporting one unit of progress per item."""
    with Reporter(total, description) as reporter:
        for item in items:
            yield item
            reporter.advance()
