"""`boothflow subjects`: every subfolder of a folder trained as its own subject under one parent run, and the
night's summary as a table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.commands.common import (
    ArtifactsOpt,
    ConfigOpt,
    SetOpt,
    SlotsOpt,
    SummaryOpt,
    check_pool,
    console,
    error,
    finished_record,
)
from flows.commands.temporary_server import report_to_server
from tasks.core.config import ConfigError
from tasks.core.subjects import subject_folders
from tasks.core.values import folder_or_url

FolderArg = Annotated[str, typer.Argument(help="Folder with one subfolder of images per subject (and an optional "
                                               "subject.toml in each), or its URL (s3://bucket/subjects)")]  # fmt: skip
PoolOpt = Annotated[
    str | None, typer.Option("--pool", help="Work pool whose workers run the subjects (default: here, in turn)")
]
RetriesOpt = Annotated[
    int,
    typer.Option("--retries", min=0, max=10, help="Try a subject whose run crashed or failed on an unexpected error "
                 "again, up to this many times (bad photos or settings are never retried)"),
]  # fmt: skip


def check_night(folder: str, config: Path | None, set_: list[str], artifacts: Path | None) -> tuple[Path, list]:
    """What a night can check before it starts: the base config and `--set`, the folder (one line, exit 2).
    Returns the night's artifact root and the subjects' folders."""
    from tasks.core.config_load import load_config

    try:
        run = load_config(config, set_, artifacts).run
        return run.artifacts_root, subject_folders(folder_or_url(folder), run.store_options)
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None


def subjects(
    folder: FolderArg,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    artifacts: ArtifactsOpt = None,
    pool: PoolOpt = None,
    slots: SlotsOpt = None,
    retries: RetriesOpt = 1,
    summary: SummaryOpt = None,
):
    """Train every subfolder of FOLDER as a subject (an unchanged one is all cache hits), then write the summary."""
    root, found = check_night(folder, config, set_ or [], artifacts)
    try:
        if not found:  # a served night may start empty; a night run now has nothing to do
            raise ConfigError(f"subjects folder {folder!r} has no subfolders: give a folder with one subfolder of "
                              "images per subject (its name is the subject's)")  # fmt: skip
        check_pool(pool, slots)
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None
    server_ready = report_to_server()
    from flows.operate import mark_crashed_runs
    from flows.subjects import subjects as subjects_flow

    server_ready()
    mark_crashed_runs()
    started = time.monotonic()
    state = subjects_flow(str(folder_or_url(folder)), str(config or ""), set_ or [], str(artifacts or ""), pool or "",
                          slots, retries, return_state=True)  # fmt: skip
    finish_night(state, root, summary, started)


def finish_night(state: Any, root: Path, summary: Path | None, started: float) -> None:
    """Print the night's record and copy it to `summary`; exit 1 when the night failed."""
    from flows.runner import parent_record

    record = parent_record(root, str(state.state_details.flow_run_id), "night")
    _print_night(finished_record(state, record, summary), time.monotonic() - started)
    if state.is_failed():
        raise typer.Exit(1)


def _print_night(result: dict, seconds: float) -> None:
    """One row per subject, failed first: its state (and cause), what each stage did, where it ran."""
    from tasks.stages.night import state_line

    table = Table(title=f"boothflow subjects {Path(result['folder']).name} ({seconds:.1f} s)")
    for column in ("subject", "state", "stages", "training (s)", "worker", "GPU", "published"):
        table.add_column(column, overflow="fold")
    for row in result["subjects"]:
        stages = ", ".join(f"{s['stage']} {s['text']}" for s in row["stages"])
        seconds_trained = f"{row['training_seconds']:.1f}" if row["training_seconds"] is not None else "—"
        state = state_line(row)
        table.add_row(row["subject"], state, stages, seconds_trained, row["worker"] or "here", row["gpu"] or "—",
                      row["published"])  # fmt: skip
    Console(width=max(console.width, 160), markup=False).print(table)
    console.print(f"summary: {result['summary']}", highlight=False, markup=False)
