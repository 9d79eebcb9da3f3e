"""What every command shares: the stderr console, the config options and how a config error ends a command."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tasks.core.config import ConfigError, RunConfig
from tasks.core.config_load import load_config
from tasks.core.shipped import shipped_configs

console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"TOML config file, or a shipped one by name: {', '.join(shipped_configs())}"),
]
ArtifactsOpt = Annotated[Path | None, typer.Option("--artifacts", help="Artifact root (overrides run.artifacts_root)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: section.key=value (repeatable)")]
SummaryOpt = Annotated[Path | None, typer.Option("--summary", help="Write the run summary JSON here")]
MemoryOpt = Annotated[
    str | None,
    typer.Option("--device-memory", help="Accelerator memory to plan for, e.g. 24GiB (default: the CUDA device's)"),
]

SlotsOpt = Annotated[
    int | None,
    typer.Option("--slots", min=1, help="With --pool: slots of the concurrency limit boothflow-gpu, one per GPU the "
                 "pool's workers share (default: as it is, 1 when new)"),
]  # fmt: skip


def check_pool(pool: str | None, slots: int | None) -> None:
    """A run on a work pool needs one Prefect server that it and the workers share; --slots means nothing without."""
    if pool is None and slots is not None:
        raise ConfigError("--slots sets the slots runs on a work pool share; it needs --pool")
    if pool is not None and not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(f"--pool {pool}: workers and this command need one Prefect server: set PREFECT_API_URL "
                          "(`boothflow ui` starts one)")  # fmt: skip


def error(message: object) -> None:
    """`error: <message>` in red; the message as written, since rich would take its [brackets] for markup."""
    console.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


def run_config(
    config: Path | None, overrides: list[str] | None, artifacts: Path | None, device_memory: str | None = None
) -> RunConfig:
    memory = [f"run.device_memory={json.dumps(device_memory)}"] if device_memory is not None else []
    try:
        return load_config(config, [*(overrides or []), *memory], artifacts)
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None


def size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def finished_record(state: Any, record: Path, summary: Path | None) -> dict:
    """A parent run's record (a sweep's, a night's) once it has ended, copied to `--summary`; a run that never wrote
    one ends the command: its error, exit 1."""
    if not record.is_file():
        console.print(f"[red]failed[/red]: {escape(str(state.result(raise_on_failure=False)))}", highlight=False)
        raise typer.Exit(1)
    result = json.loads(record.read_text())
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result, indent=1))
    return result
