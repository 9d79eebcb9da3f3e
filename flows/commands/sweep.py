"""`boothflow sweep`: a sweep file's cells as dreambooth runs under one parent run, and a table of the cells."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.commands.common import ArtifactsOpt, SlotsOpt, SummaryOpt, check_pool, console, error, finished_record
from flows.commands.temporary_server import report_to_server
from tasks.core.config import ConfigError


def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep TOML file, or a shipped one by name: toy, writeup")],
    pool: Annotated[
        str | None, typer.Option("--pool", help="Work pool whose workers run the cells (default: here, in turn)")
    ] = None,
    slots: SlotsOpt = None,
    artifacts: ArtifactsOpt = None,
    summary: SummaryOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="section.key=value for every cell; on a matrix key, its values (a list)"),
    ] = None,
):
    """Run a sweep file's cells as dreambooth runs under one parent run, then write their comparison page."""
    from flows.preflight import check_before_start, check_settings
    from tasks.core.sweeps import load_sweep

    try:
        spec = load_sweep(file, set_ or [], artifacts)
        check_pool(pool, slots)
        for cell in spec.cells:
            try:
                check_settings(cell.config) if pool else check_before_start(cell.config)
            except ConfigError as err:
                raise ConfigError(f"sweep {spec.name}, cell {cell.name!r}: {err}") from None
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None
    root = spec.base.run.artifacts_root
    server_ready = report_to_server()
    from flows.operate import mark_crashed_runs
    from flows.sweep import sweep as sweep_flow

    server_ready()
    mark_crashed_runs()
    started = time.monotonic()
    state = sweep_flow(spec, pool or "", slots, return_state=True)
    finish_sweep(state, root, summary, started)


def finish_sweep(state: Any, root: Path, summary: Path | None, started: float) -> None:
    """Print the sweep's record and copy it to `summary`; exit 1 when the sweep failed."""
    from flows.runner import parent_record

    record = parent_record(root, str(state.state_details.flow_run_id), "sweep")
    _print_sweep(finished_record(state, record, summary), time.monotonic() - started)
    if state.is_failed():
        raise typer.Exit(1)


def _print_sweep(result: dict, seconds: float) -> None:
    """One row per cell: its state and what each stage did (`ran 5` items, or `cached`)."""
    stages = list(dict.fromkeys(name for c in result["cells"] for name in ((c["summary"] or {}).get("stages") or {})))
    table = Table(title=f"boothflow sweep {result['sweep']} ({seconds:.1f} s)")
    for column in ("cell", "state", *stages):
        table.add_column(column, overflow="fold")
    for cell in result["cells"]:
        done = (cell["summary"] or {}).get("stages") or {}
        shown = [_stage_cell(done.get(name, {})) for name in stages]
        table.add_row(cell["cell"], cell["state"], *shown)
    Console(width=max(console.width, 160), markup=False).print(table)
    console.print(f"comparison: {result['comparison']}", highlight=False, markup=False)


def _stage_cell(stage: dict) -> str:
    status = stage.get("status", "")
    return f"{status} {stage['items_processed']}" if status == "ran" else status
