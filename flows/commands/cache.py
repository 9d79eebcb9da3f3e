"""`boothflow cache ls|verify|gc`: the stage cache, looked at, checked byte for byte and pruned; `boothflow forget`:
what one subject's photos made, removed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.commands.common import ArtifactsOpt, ConfigOpt, SetOpt, console, error, run_config, size
from tasks.core.config import ConfigError, RunConfig

app = typer.Typer(no_args_is_help=True, help="Inspect the stage cache.")


@app.command("ls")
def cache_ls(config: ConfigOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None):
    """List store entries: stage, key, size, age, state (complete, damaged and set aside, partial, incomplete)."""
    from tasks.core.store import Store

    cfg = run_config(config, set_, artifacts)
    table = Table(title=f"cache at {cfg.run.artifacts_root}")
    for column in ("stage", "key", "size", "age", "state"):
        table.add_column(column)
    now = time.time()
    for entry in Store(cfg.run.artifacts_root).entries():
        table.add_row(
            entry["stage"],
            entry["key"],
            size(entry["bytes"]),
            _age(now - entry["modified"]),
            entry["state"],
        )
    Console().print(table)


@app.command("verify")
def cache_verify(
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage's entries, e.g. train")] = None,
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
):
    """Re-hash every file of every complete entry; exit 1 naming each damaged one. Lookups only compare stats,
    so this is the check that finds bytes changed behind an unchanged size, mtime, ctime and inode."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from tasks.core.store import Store

    root = run_config(config, set_, artifacts).run.artifacts_root
    columns = (BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("verifying", *columns, console=console) as bar:
        task = bar.add_task("verify", total=None)
        result = Store(root).verify(stage, lambda done, total: bar.update(task, completed=done, total=total))
    out = Console(soft_wrap=True, markup=False)
    for damage in result.damaged:
        out.print(f"damaged: {damage.stage} {damage.key} {damage.file}: {damage.problem}", highlight=False)
    damaged = len({(damage.stage, damage.key) for damage in result.damaged})
    checked = f"checked {result.entries} entries ({size(result.bytes)}) at {root}"
    if damaged:
        out.print(f"{checked}: {damaged} damaged; a run that needs one sets it aside and rebuilds it", highlight=False)
        raise typer.Exit(1)
    out.print(f"{checked}: all intact", highlight=False)


@app.command("gc")
def cache_gc(
    keep_last: Annotated[
        int | None, typer.Option("--keep-last", min=0, help="Keep the entries the last N runs used")
    ] = None,
    older_than: Annotated[
        float | None, typer.Option("--older-than", min=0, help="Remove entries not used for DAYS days")
    ] = None,
    keep_nights: Annotated[
        int | None,
        typer.Option("--keep-nights", min=0, help="Keep what each subject's last N runs used, and published models"),
    ] = None,
    damaged: Annotated[bool, typer.Option("--damaged", help="Remove entries set aside as damaged")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; remove nothing")] = False,
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
):
    """Remove old or damaged entries; never one a running run uses. With more than one of --keep-last, --older-than and
    --keep-nights, an entry goes only when each says so. A subject is an instance folder: --keep-nights keeps the
    entries of its last N runs and of its published model (a subjects night's promotion)."""
    from flows.gc import Rules, collect

    rules = Rules(keep_last, older_than, keep_nights, damaged)
    if not rules.any_age_rule() and not damaged:
        error("say what to remove: --keep-last N, --older-than DAYS, --keep-nights N and/or --damaged")
        raise typer.Exit(2)
    root = run_config(config, set_, artifacts).run.artifacts_root
    every = {"prior": {"enabled": True}, "train": {"pick": "best:dino", "sample_every": 1}}  # every stage there is
    stages = [name for name in RunConfig.model_validate(every).stage_names() if name not in ("validate", "score")]
    removals, notes, freed = collect(root, stages, rules, dry_run)
    out = Console(soft_wrap=True, markup=False)
    for removal in removals:
        verb = "would remove" if dry_run else "removed"
        out.print(f"{verb} {removal.stage}/{removal.folder} ({size(removal.bytes)}): {removal.why}", highlight=False)
    for note in notes:
        out.print(note, highlight=False)
    out.print(f"{len(removals)} entries, {size(freed)} {'to free' if dry_run else 'freed'} at {root}", highlight=False)


def forget(
    target: Annotated[Path, typer.Argument(help="The subject's instance folder, or with --subjects its name")],
    subjects: Annotated[Path | None, typer.Option("--subjects", help="The subjects folder TARGET is a name in")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; remove nothing")] = False,
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
):
    """Remove every entry a subject's photos made (preprocessing, latents, training and its checkpoints, samples,
    scores, report) and the runs' records; nothing another subject still uses, and never class images."""
    from flows.forget import forget as forget_folder

    folder = subjects / target if subjects is not None else target
    root = run_config(config, set_, artifacts).run.artifacts_root
    try:
        done = forget_folder(root, folder, dry_run)
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None
    out = Console(soft_wrap=True, markup=False)
    verb = "would remove" if dry_run else "removed"
    for removal in done.removals:
        out.print(f"{verb} {removal.stage}/{removal.folder} ({size(removal.bytes)}): {removal.why}", highlight=False)
    out.print(f"{len(done.removals)} entries and {len(done.runs)} runs' records of {folder}, {size(done.bytes)} "
              f"{'to free' if dry_run else 'freed'} at {root}", highlight=False)  # fmt: skip


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"
