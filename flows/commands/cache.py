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


RemoteOpt = Annotated[bool, typer.Option("--remote", help="The shared store (run.store), not the artifact root")]


def _remote(cfg: RunConfig):
    """The run's shared store, for --remote; exits 2 in one line when there is none or it cannot be reached."""
    from tasks.core.remote import Remote
    from tasks.core.store import RemoteError

    if not cfg.run.store:
        error("--remote needs a shared store: set run.store (e.g. --set run.store='s3://bucket/prefix')")
        raise typer.Exit(2)
    try:
        remote = Remote(cfg.run.store, cfg.run.store_options)
        remote.check()
    except RemoteError as err:
        error(err.message)
        raise typer.Exit(2) from None
    return remote


@app.command("ls")
def cache_ls(remote: RemoteOpt = False, config: ConfigOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None):
    """List store entries: stage, key, size, age, state (complete, damaged and set aside, partial, incomplete)."""
    from tasks.core.store import Store

    cfg = run_config(config, set_, artifacts)
    where = cfg.run.store if remote else cfg.run.artifacts_root
    table = Table(title=f"cache at {where}")
    for column in ("stage", "key", "size", "age", "state"):
        table.add_column(column)
    now = time.time()
    entries = _remote_entries(_remote(cfg)) if remote else Store(cfg.run.artifacts_root).entries()
    for entry in entries:
        table.add_row(
            entry["stage"],
            entry["key"],
            size(entry["bytes"]),
            _age(now - entry["modified"]),
            entry["state"],
        )
    Console().print(table)


def _remote_entries(remote) -> list[dict]:
    """The shared store's entries as `cache ls` shows them: a manifest there is a committed entry."""
    return [
        {"stage": stage, "key": key, "state": "complete" if manifest else "unreadable",
         "bytes": sum(m["size"] for m in manifest["files"].values()) if manifest else 0,
         "modified": manifest.get("created_at", 0) if manifest else 0}
        for stage, key, manifest in remote.entries()
    ]  # fmt: skip


@app.command("verify")
def cache_verify(
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage's entries, e.g. train")] = None,
    remote: RemoteOpt = False,
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
):
    """Re-hash every file of every complete entry; exit 1 naming each damaged one. Lookups only compare stats,
    so this is the check that finds bytes changed behind an unchanged size, mtime, ctime and inode. With --remote,
    download and hash every blob of the shared store's entries."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from tasks.core.store import Store

    cfg = run_config(config, set_, artifacts)
    root = cfg.run.artifacts_root
    columns = (BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn())
    if remote:
        _verify_remote(_remote(cfg), columns)
        return
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


def _verify_remote(remote, columns: tuple) -> None:
    from rich.progress import Progress

    from tasks.core.store import RemoteError

    try:
        with Progress("verifying", *columns, console=console) as bar:
            task = bar.add_task("verify", total=None)
            entries, problems = remote.verify(lambda done, total: bar.update(task, completed=done, total=total))
    except RemoteError as err:
        error(err.message)
        raise typer.Exit(2) from None
    out = Console(soft_wrap=True, markup=False)
    for problem in problems:
        out.print(f"damaged: {problem}", highlight=False)
    checked = f"checked {entries} entries at {remote.url}"
    if problems:
        out.print(f"{checked}: {len(problems)} damaged files; a run never trusts those entries", highlight=False)
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
