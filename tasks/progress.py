"""Progress of long steps: a rich bar on an interactive terminal, log lines and a Prefect progress artifact.

Stages call `track(...)` and stay unaware of where they run; outside a Prefect run only the bar and logs show.
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


def _prefect_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.context import TaskRunContext
    from prefect.logging import get_logger, get_run_logger

    return get_run_logger() if TaskRunContext.get() else get_logger("boothflow")


def _progress_artifact(description: str):
    """A progress artifact for the current task run, or None outside one."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        return None
    artifact_id = create_progress_artifact(0.0, description=description)
    return lambda percent: update_progress_artifact(artifact_id, percent)


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Yield `items`, reporting progress every few seconds and at the end."""
    log = _prefect_logger()
    update = _progress_artifact(description) if total else None
    bar = Progress(transient=True, disable=not sys.stderr.isatty())
    last = time.monotonic()
    with bar:
        task = bar.add_task(description, total=total)
        for done, item in enumerate(items, start=1):
            yield item
            bar.advance(task)
            now = time.monotonic()
            if now - last >= LOG_EVERY_SECONDS or done == total:
                last = now
                log.info("%s: %d/%d", description, done, total)
                if update:
                    update(100.0 * done / total)
