"""`boothflow plan`: each stage's peak accelerator memory, estimated before anything loads."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.commands.common import ArtifactsOpt, ConfigOpt, MemoryOpt, SetOpt, console, run_config


def plan(
    config: ConfigOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None, device_memory: MemoryOpt = None
):
    """Estimate each stage's peak accelerator memory before anything loads; exit 1 when a stage cannot fit."""
    from tasks.core.values import GIB
    from tasks.sd.memory import PARTS, MemoryPlanError, architecture
    from tasks.sd.memory_plan import device_memory as memory_of
    from tasks.sd.memory_plan import estimates, verdict

    cfg = run_config(config, set_, artifacts, device_memory)
    arch = architecture(cfg.model.id, cfg.run.artifacts_root, cfg.model.revision)
    if arch is None:
        console.print(
            f"the architecture of {cfg.model.id!r} is unknown until it is downloaded", highlight=False, markup=False
        )
        raise typer.Exit(1)
    found = estimates(cfg, arch)
    console.print(f"model {cfg.model.id} ({arch.family})", highlight=False, markup=False)
    table = Table(title="memory plan (GiB)")
    table.add_column("part")
    for estimate in found:
        table.add_column(estimate.stage, justify="right")
    for part in [part for part in PARTS if any(part in e.parts for e in found)]:
        table.add_row(part, *(f"{e.parts[part] / GIB:.2f}" if part in e.parts else "" for e in found))
    table.add_row("total", *(f"{e.total / GIB:.2f}" for e in found))
    Console().print(table)
    memory = memory_of(cfg)
    if memory is None:
        console.print("no CUDA device here: pass --device-memory (e.g. 24GiB) to check a device", highlight=False)
        return
    try:
        warnings = verdict(cfg, arch, found, memory)  # the estimates above, judged: nothing traced twice
    except MemoryPlanError as err:
        console.print(f"[red]does not fit[/red]: {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    for warning in warnings:
        console.print(f"[yellow]warning[/yellow]: {escape(warning)}", highlight=False)
    source = "as stated" if cfg.run.device_memory else "the CUDA device's"
    console.print(f"fits in {memory / GIB:.1f} GiB ({source})", highlight=False)
