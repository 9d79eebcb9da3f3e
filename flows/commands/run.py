"""Running the pipeline (`run`, `stage`, `rerun`) and listing runs (`runs`); a run ends with a table of what each
stage did."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.commands.common import ArtifactsOpt, ConfigOpt, MemoryOpt, SetOpt, SummaryOpt, console, error, run_config
from flows.commands.subjects import finish_night
from flows.commands.sweep import finish_sweep
from flows.commands.temporary_server import report_to_server, server_line
from tasks.core.config import ConfigError, RunConfig


def run(
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    summary: SummaryOpt = None,
    set_: SetOpt = None,
    device_memory: MemoryOpt = None,
):
    """Run the whole pipeline; stages whose inputs did not change are cache hits."""
    _execute(run_config(config, set_, artifacts, device_memory), summary, stage=None)


def stage(
    name: Annotated[str, typer.Argument(help="Stage to run, e.g. preprocess")],
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    summary: SummaryOpt = None,
    set_: SetOpt = None,
    device_memory: MemoryOpt = None,
):
    """Run one stage from cached upstream outputs (names the upstream that is missing)."""
    _execute(run_config(config, set_, artifacts, device_memory), summary, stage=name)


def rerun(
    run_id: Annotated[str, typer.Argument(help="Flow run id, as `boothflow runs` lists it")],
    summary: SummaryOpt = None,
):
    """Retry a finished run (a night or sweep too) under the same id: cached stages are skipped, the failed one
    resumes."""
    from flows.liveness import artifacts_root
    from flows.operate import rerun as retry

    console.print(server_line(), highlight=False, markup=False)
    started = time.monotonic()
    flow_run, flow_name, state = retry(run_id)
    if state is None:
        console.print(
            f"run {run_id} belongs to a deployment: its serve process or worker will pick it up", markup=False
        )
        return
    finish = {"dreambooth-subjects": finish_night, "dreambooth-sweep": finish_sweep}.get(flow_name, _finish)
    finish(state, artifacts_root(flow_run), summary, started)


def runs(limit: Annotated[int, typer.Option(help="How many recent runs to list")] = 20):
    """Recent runs with their state and, for failed ones, the stage that failed and why."""
    from flows.operate import recent_runs

    table = Table(title="boothflow runs")
    rows = recent_runs(limit)
    for column in ("id", "run", "state", "started", "attempts", "failed stage", "cause"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("id", "run", "state", "started", "attempts", "failed stage", "cause")))
    Console(width=200, markup=False).print(table)


def _execute(cfg: RunConfig, summary: Path | None, stage: str | None) -> None:
    if stage is not None and stage not in cfg.stage_names():
        names = ", ".join(cfg.stage_names())
        error(f"no stage {stage!r} in this config; stages are: {names}")
        raise typer.Exit(2)
    server_ready = report_to_server()
    from flows.preflight import check_before_start

    try:
        check_before_start(cfg)
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None
    from flows.dreambooth import dreambooth, dreambooth_stage  # imports Prefect, which reads PREFECT_API_URL once
    from flows.operate import mark_crashed_runs

    server_ready()
    mark_crashed_runs()
    started = time.monotonic()
    state = dreambooth(cfg, return_state=True) if stage is None else dreambooth_stage(cfg, stage, return_state=True)
    _finish(state, cfg.run.artifacts_root, summary, started)


def _finish(state, root: Path, summary: Path | None, started: float) -> None:
    """Print and save the run's summary; exit 1 when the run failed."""
    from flows.records import summary_path

    record = summary_path(root, str(state.state_details.flow_run_id))
    result = json.loads(record.read_text()) if record.is_file() else None
    if result is None:
        failure = state.result(raise_on_failure=False)
        result = {"stages": {}, "outputs": {}, "error": {"stage": None, "item": None, "message": str(failure)}}
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result, indent=1))
    _print_summary(result, time.monotonic() - started)
    if state.is_failed() or result["error"]:
        raise typer.Exit(1)


def _print_summary(result: dict, seconds: float) -> None:
    table = Table(title=f"boothflow run ({seconds:.1f} s)")
    for column in ("stage", "status", "seconds", "processed", "cached", "rejected", "key"):
        table.add_column(column)
    for name, s in result["stages"].items():
        table.add_row(
            name,
            s["status"],
            f"{s.get('seconds', 0):.1f}",
            *(str(s.get(k, "")) for k in ("items_processed", "items_cached", "items_rejected", "key")),
        )
    console.print(table)
    for name, path in result["outputs"].items():
        console.print(f"{name}: {path}", highlight=False, markup=False)
    if result.get("waiting"):
        console.print(f"waiting for the next run (modified in the last data.settle_minutes): "
                      f"{', '.join(result['waiting'])}", highlight=False, markup=False)  # fmt: skip
    failed = result["error"]
    if failed:
        where = ", ".join(str(failed[k]) for k in ("stage", "item") if failed.get(k))
        console.print(f"[red]failed[/red] ({escape(where)}): {escape(failed['message'])}", highlight=False)
