"""The `boothflow` command: run the pipeline or one stage, and look at the cache and the models.

Config errors are one line without a traceback; a run ends with a table of what each stage did.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.core.config import ConfigError, RunConfig, load_config
from tasks.core.shipped import shipped_configs

# The temporary server Prefect starts without PREFECT_API_URL otherwise logs an error on offline machines.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="DreamBooth fine-tuning as a cached Prefect flow.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect the stage cache.")
models_app = typer.Typer(no_args_is_help=True, help="Base models and presets.")
app.add_typer(cache_app, name="cache")
app.add_typer(models_app, name="models")
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


def _error(message: object) -> None:
    """`error: <message>` in red; the message as written, since rich would take its [brackets] for markup."""
    console.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


def _config(
    config: Path | None, overrides: list[str] | None, artifacts: Path | None, device_memory: str | None = None
) -> RunConfig:
    memory = [f"run.device_memory={json.dumps(device_memory)}"] if device_memory is not None else []
    try:
        return load_config(config, [*(overrides or []), *memory], artifacts)
    except ConfigError as err:
        _error(err)
        raise typer.Exit(2) from None


def _server_line() -> str:
    url = os.environ.get("PREFECT_API_URL")
    return f"reporting to Prefect server {url}" if url else "no PREFECT_API_URL: using a temporary local Prefect server"


def _report_to_server() -> Callable[[], None]:
    """PREFECT_API_URL's server, or a temporary one that lives exactly as long as this process. That one boots while
    the caller checks the config and imports the flow; the returned function waits until it answers."""
    from flows.server import start_temporary_server

    if os.environ.get("PREFECT_API_URL"):
        return partial(console.print, _server_line(), highlight=False, markup=False)
    log = Path(tempfile.gettempdir()) / f"boothflow-prefect-server-{os.getpid()}.log"
    wait = start_temporary_server(log)

    def ready() -> None:
        console.print("no PREFECT_API_URL: starting a temporary local Prefect server for this run", highlight=False)
        try:
            wait()
        except RuntimeError:
            _error(f"the temporary Prefect server did not start (its log: {log}); set PREFECT_API_URL to a running "
                   "server")  # fmt: skip
            raise typer.Exit(1) from None

    return ready


def _execute(cfg: RunConfig, summary: Path | None, stage: str | None) -> None:
    if stage is not None and stage not in cfg.stage_names():
        names = ", ".join(cfg.stage_names())
        _error(f"no stage {stage!r} in this config; stages are: {names}")
        raise typer.Exit(2)
    server_ready = _report_to_server()
    from flows.preflight import check_before_start

    try:
        check_before_start(cfg)
    except ConfigError as err:
        _error(err)
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
    from flows.runner import summary_path

    record = summary_path(root, str(state.state_details.flow_run_id))
    result = json.loads(record.read_text()) if record.is_file() else None
    if result is None:
        error = state.result(raise_on_failure=False)
        result = {"stages": {}, "outputs": {}, "error": {"stage": None, "item": None, "message": str(error)}}
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
    error = result["error"]
    if error:
        where = ", ".join(str(error[k]) for k in ("stage", "item") if error.get(k))
        console.print(f"[red]failed[/red] ({escape(where)}): {escape(error['message'])}", highlight=False)


@app.command()
def run(
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    summary: SummaryOpt = None,
    set_: SetOpt = None,
    device_memory: MemoryOpt = None,
):
    """Run the whole pipeline; stages whose inputs did not change are cache hits."""
    _execute(_config(config, set_, artifacts, device_memory), summary, stage=None)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage to run, e.g. preprocess")],
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    summary: SummaryOpt = None,
    set_: SetOpt = None,
    device_memory: MemoryOpt = None,
):
    """Run one stage from cached upstream outputs (names the upstream that is missing)."""
    _execute(_config(config, set_, artifacts, device_memory), summary, stage=name)


@app.command()
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep TOML file, or a shipped one by name: toy, writeup")],
    pool: Annotated[
        str | None, typer.Option("--pool", help="Work pool whose workers run the cells (default: here, in turn)")
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", min=1, help="With --pool: slots of the concurrency limit boothflow-gpu (default 1)"),
    ] = None,
    artifacts: ArtifactsOpt = None,
    summary: SummaryOpt = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="section.key=value for every cell; on a matrix key, its values (a list)"),
    ] = None,
):
    """Run a sweep file's cells as dreambooth runs under one parent run, then write their comparison page."""
    from flows.preflight import check_before_start
    from tasks.core.sweeps import load_sweep

    try:
        spec = load_sweep(file, set_ or [], artifacts)
        if pool is None and gpus is not None:
            raise ConfigError("--gpus sets the slots cells on a work pool share; it needs --pool")
        if pool is not None and not os.environ.get("PREFECT_API_URL"):
            raise ConfigError(f"--pool {pool}: workers and this command need one Prefect server: set PREFECT_API_URL "
                              "(`boothflow ui` starts one)")  # fmt: skip
        for cell in spec.cells:
            try:
                check_before_start(cell.config)
            except ConfigError as err:
                raise ConfigError(f"sweep {spec.name}, cell {cell.name!r}: {err}") from None
    except ConfigError as err:
        _error(err)
        raise typer.Exit(2) from None
    root = spec.base.run.artifacts_root
    server_ready = _report_to_server()
    from flows.operate import mark_crashed_runs
    from flows.sweep import sweep as sweep_flow
    from flows.sweep import sweep_record

    server_ready()
    mark_crashed_runs()
    started = time.monotonic()
    state = sweep_flow(spec, pool or "", gpus, return_state=True)
    record = sweep_record(root, str(state.state_details.flow_run_id))
    if not record.is_file():
        console.print(f"[red]failed[/red]: {escape(str(state.result(raise_on_failure=False)))}", highlight=False)
        raise typer.Exit(1)
    result = json.loads(record.read_text())
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result, indent=1))
    _print_sweep(result, time.monotonic() - started)
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


@app.command()
def plan(
    config: ConfigOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None, device_memory: MemoryOpt = None
):
    """Estimate each stage's peak accelerator memory before anything loads; exit 1 when a stage cannot fit."""
    from tasks.core.config import GIB
    from tasks.sd.memory import PARTS, MemoryPlanError, architecture, estimates, verdict
    from tasks.sd.memory import device_memory as memory_of

    cfg = _config(config, set_, artifacts, device_memory)
    arch = architecture(cfg.model.id, cfg.run.artifacts_root)
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


@app.command()
def rerun(
    run_id: Annotated[str, typer.Argument(help="Flow run id, as `boothflow runs` lists it")],
    summary: SummaryOpt = None,
):
    """Retry a finished run under the same id: cached stages are skipped, the failed one resumes."""
    from flows.operate import rerun as retry

    console.print(_server_line(), highlight=False, markup=False)
    started = time.monotonic()
    flow_run, state = retry(run_id)
    if state is None:
        console.print(
            f"run {run_id} belongs to a deployment: its serve process or worker will pick it up", markup=False
        )
        return
    root = Path(flow_run.parameters["config"]["run"]["artifacts_root"])
    _finish(state, root, summary, started)


@app.command()
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


@app.command()
def serve(
    config: ConfigOpt = None,
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * *' (3 am)")] = "0 3 * * *",
    timezone: Annotated[
        str | None, typer.Option(help="IANA time zone of the schedule; default: this machine's")
    ] = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
    device_memory: MemoryOpt = None,
    notify: Annotated[
        str | None, typer.Option("--notify", help="Webhook URL to POST to when a night fails or crashes")
    ] = None,
):
    """Serve the nightly deployment: the config is frozen in now, so restart serve after editing it."""
    from flows.operate import SERVED_DEPLOYMENT, local_timezone, mark_crashed_runs, notify_failed_nights, serve_nightly

    cfg = _config(config, set_, artifacts, device_memory)
    _check_webhook(notify)
    zone = timezone or local_timezone()
    console.print(_server_line(), highlight=False, markup=False)
    console.print(
        f"serving deployment dreambooth/{SERVED_DEPLOYMENT}: cron {cron!r} in time zone {zone}",
        highlight=False,
        markup=False,
    )
    mark_crashed_runs()
    if notify:
        notify_failed_nights(notify)
        console.print(f"a failed or crashed night posts to {notify}", highlight=False, markup=False)
    serve_nightly(cfg, cron, zone)


def _check_webhook(url: str | None) -> None:
    if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        _error(f"webhook {url!r}: expected an http(s) URL")
        raise typer.Exit(2)


@app.command()
def notify(
    url: Annotated[str, typer.Argument(help="Webhook URL to POST to")],
    deployment: Annotated[
        str, typer.Option("--deployment", help="Deployment name, e.g. nightly-worker from prefect.yaml")
    ] = "nightly",
):
    """Post to a webhook when a run of a dreambooth deployment fails or crashes (a Prefect automation)."""
    _check_webhook(url)
    from flows.operate import notify_failed_nights

    notify_failed_nights(url, deployment)
    console.print(f"a failed or crashed run of dreambooth/{deployment} posts to {url}", highlight=False, markup=False)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port of the Prefect server and its UI")] = 4200,
    files_port: Annotated[int, typer.Option(help="Port serving the artifact root (report links)")] = 0,
    artifacts: ArtifactsOpt = None,
):
    """Start a local Prefect server with its UI on 127.0.0.1 and serve the artifact root for report links."""
    from flows.operate import serve_files
    from flows.publish import ui_file
    from flows.server import HOST, api_url, free_port, start_server, stop_server, wait_healthy

    cfg = _config(None, [], artifacts)
    root = cfg.run.artifacts_root
    root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server and files cleanly on SIGTERM too
    log = root / ".prefect-server.log"
    server = start_server(port, None, log)
    files = serve_files(root, files_port or free_port())
    record = ui_file(root)
    try:
        wait_healthy(server, api_url(port), 120, log)
        files_url = f"http://{HOST}:{files.server_address[1]}"
        record.write_text(json.dumps({"api_url": api_url(port), "artifacts_url": files_url}))
        console.print(f"Prefect UI: http://{HOST}:{port}", highlight=False)
        console.print(f"point runs at it: export PREFECT_API_URL={api_url(port)}", highlight=False)
        console.print(f"reports served from {root} at {files_url}; Ctrl-C stops both", highlight=False, markup=False)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        record.unlink(missing_ok=True)
        files.shutdown()
        stop_server(server)


@cache_app.command("ls")
def cache_ls(config: ConfigOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None):
    """List store entries: stage, key, size, age, state (complete, damaged and set aside, partial, incomplete)."""
    from tasks.core.store import Store

    cfg = _config(config, set_, artifacts)
    table = Table(title=f"cache at {cfg.run.artifacts_root}")
    for column in ("stage", "key", "size", "age", "state"):
        table.add_column(column)
    now = time.time()
    for entry in Store(cfg.run.artifacts_root).entries():
        table.add_row(
            entry["stage"],
            entry["key"],
            _size(entry["bytes"]),
            _age(now - entry["modified"]),
            entry["state"],
        )
    Console().print(table)


@cache_app.command("verify")
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

    root = _config(config, set_, artifacts).run.artifacts_root
    columns = (BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("verifying", *columns, console=console) as bar:
        task = bar.add_task("verify", total=None)
        result = Store(root).verify(stage, lambda done, total: bar.update(task, completed=done, total=total))
    out = Console(soft_wrap=True, markup=False)
    for damage in result.damaged:
        out.print(f"damaged: {damage.stage} {damage.key} {damage.file}: {damage.problem}", highlight=False)
    damaged = len({(damage.stage, damage.key) for damage in result.damaged})
    checked = f"checked {result.entries} entries ({_size(result.bytes)}) at {root}"
    if damaged:
        out.print(f"{checked}: {damaged} damaged; a run that needs one sets it aside and rebuilds it", highlight=False)
        raise typer.Exit(1)
    out.print(f"{checked}: all intact", highlight=False)


@cache_app.command("gc")
def cache_gc(
    keep_last: Annotated[
        int | None, typer.Option("--keep-last", min=0, help="Keep the entries the last N runs used")
    ] = None,
    older_than: Annotated[
        float | None, typer.Option("--older-than", min=0, help="Remove entries not used for DAYS days")
    ] = None,
    damaged: Annotated[bool, typer.Option("--damaged", help="Remove entries set aside as damaged")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; remove nothing")] = False,
    config: ConfigOpt = None,
    artifacts: ArtifactsOpt = None,
    set_: SetOpt = None,
):
    """Remove old or damaged entries; never one a running run uses. With --keep-last and --older-than both,
    an entry goes only when both say so."""
    from flows.gc import collect

    if keep_last is None and older_than is None and not damaged:
        _error("say what to remove: --keep-last N, --older-than DAYS and/or --damaged")
        raise typer.Exit(2)
    root = _config(config, set_, artifacts).run.artifacts_root
    every = {"prior": {"enabled": True}, "train": {"pick": "best:dino", "sample_every": 1}}  # every stage there is
    stages = [name for name in RunConfig.model_validate(every).stage_names() if name not in ("validate", "score")]
    removals, notes, freed = collect(root, stages, keep_last, older_than, damaged, dry_run)
    out = Console(soft_wrap=True, markup=False)
    for removal in removals:
        verb = "would remove" if dry_run else "removed"
        out.print(f"{verb} {removal.stage}/{removal.folder} ({_size(removal.bytes)}): {removal.why}", highlight=False)
    for note in notes:
        out.print(note, highlight=False)
    out.print(f"{len(removals)} entries, {_size(freed)} {'to free' if dry_run else 'freed'} at {root}", highlight=False)


@models_app.command("ls")
def models_ls(config: ConfigOpt = None, artifacts: ArtifactsOpt = None, set_: SetOpt = None):
    """List the presets and which of them are built under the artifact root."""
    from tasks.sd.models import list_models

    cfg = _config(config, set_, artifacts)
    table = Table(title="models")
    for column in ("preset", "family", "built", "size", "description"):
        table.add_column(column)
    for row in list_models(cfg.run.artifacts_root):
        built = "yes" if row["built"] else "no"
        table.add_row(row["name"], row["family"], built, _size(row["size_bytes"]), row["description"])
    Console().print(table)


@models_app.command("pretrain-toy")
def models_pretrain_toy(
    out: Annotated[
        Path | None, typer.Option("--out", help="Model folder to write (default: <artifacts>/models/...)")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="A rough model in a few minutes (tests, trying it out)")
    ] = False,
    minutes: Annotated[float, typer.Option("--minutes", help="Train at most this long, then save and return")] = 10.0,
    artifacts: ArtifactsOpt = None,
):
    """Pretrain toy-sd on the toy world, resumably: run it again until it says done."""
    from tasks.toy.pretrain import FULL, QUICK, PretrainError, pretrain

    root = _config(None, [], artifacts).run.artifacts_root
    out = (out or root / "models" / ("toy-sd-quick" if quick else "toy-sd-pretrained")).expanduser().resolve()
    _show_progress_logs()
    try:
        state = pretrain(out, QUICK if quick else FULL, minutes)
    except PretrainError as err:
        _error(err)
        raise typer.Exit(1) from None
    cpu = f"{state.cpu_seconds / 60:.1f} CPU minutes so far"
    if state.phase != "done":
        console.print(
            f"paused in phase {state.phase!r} at step {state.step} ({cpu}); run the same command again to go on"
        )
        raise typer.Exit(3)
    scores = ", ".join(f"{name} {100 * value:.0f}%" for name, value in state.fidelity.items())
    console.print(f"done: {out} ({cpu}); caption fidelity: {scores}", highlight=False, markup=False)


def _show_progress_logs() -> None:
    """Outside a flow run Prefect's loggers drop INFO lines; a long command outside one prints them (progress and
    the VAE gate's figures) on stderr, bar or no bar."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("prefect.boothflow")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(console=console, show_path=False))


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


if __name__ == "__main__":
    app()
