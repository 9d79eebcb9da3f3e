"""Long-lived commands: serving the nightly deployment (`serve`), its failure webhook (`notify`) and a local Prefect
server with its UI (`ui`)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Annotated

import typer

from flows.commands.common import (
    ArtifactsOpt,
    ConfigOpt,
    MemoryOpt,
    SetOpt,
    SlotsOpt,
    check_pool,
    console,
    error,
    run_config,
)
from flows.commands.subjects import PoolOpt, RetriesOpt, check_night
from flows.commands.temporary_server import server_line
from tasks.core.config import ConfigError
from tasks.core.values import folder_or_url

SUBJECTS_HELP = (
    "Serve a subjects night instead: every subfolder of this folder (or URL), listed each night, is a subject"
)
GPUS_HELP = (
    "GPUs, one worker each, e.g. 0,1,2,3; '+' gives one worker several, for runs of that many training "
    "processes: 0,1,2+3 (default: every visible CUDA device alone; one worker without CUDA)"
)


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
    subjects: Annotated[str | None, typer.Option("--subjects", help=SUBJECTS_HELP)] = None,
    pool: PoolOpt = None,
    slots: SlotsOpt = None,
    retries: RetriesOpt = 1,
):
    """Serve the nightly deployment: the config is frozen in now, so restart serve after editing it. With
    --subjects, the folder is read each night; its parent run runs here and its subjects here or on --pool."""
    from flows.operate import local_timezone, mark_crashed_runs, notify_failed_nights

    _check_webhook(notify)
    if subjects is not None:
        check_night(subjects, config, set_ or [], artifacts)
    cfg = run_config(config, set_, artifacts, device_memory)
    if subjects is None and (pool is not None or slots is not None):
        error("--pool and --slots run the subjects of --subjects on a work pool; give --subjects FOLDER")
        raise typer.Exit(2)
    try:
        check_pool(pool, slots)
    except ConfigError as err:
        error(err)
        raise typer.Exit(2) from None
    zone = timezone or local_timezone()
    deployment = _deployment(subjects)
    console.print(server_line(), highlight=False, markup=False)
    console.print(f"serving deployment {deployment}: cron {cron!r} in time zone {zone}", highlight=False, markup=False)
    mark_crashed_runs()
    if notify:
        notify_failed_nights(notify, deployment.split("/")[1])
        console.print(f"a failed or crashed night posts to {notify}", highlight=False, markup=False)
    if subjects is None:
        from flows.operate import serve_nightly

        serve_nightly(cfg, cron, zone)
        return
    from flows.operate import serve_subjects

    memory = [f"run.device_memory={json.dumps(device_memory)}"] if device_memory is not None else []
    parameters = {"folder": str(folder_or_url(subjects)), "config": str(config or ""),
                  "settings": [*(set_ or []), *memory],
                  "artifacts": str(cfg.run.artifacts_root), "pool": pool or "", "slots": slots,
                  "retries": retries}  # fmt: skip
    serve_subjects(parameters, cron, zone)


def _deployment(subjects: str | None) -> str:
    from flows.operate import SERVED_DEPLOYMENT, SUBJECTS_DEPLOYMENT

    return f"dreambooth-subjects/{SUBJECTS_DEPLOYMENT}" if subjects else f"dreambooth/{SERVED_DEPLOYMENT}"


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


def ui(
    port: Annotated[int, typer.Option(help="Port of the Prefect server and its UI")] = 4200,
    files_port: Annotated[int, typer.Option(help="Port serving the artifact root (report links)")] = 0,
    artifacts: ArtifactsOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
):
    """Start a local Prefect server with its UI on 127.0.0.1 and serve the artifact root for report links; with
    run.store set, a report another machine made is fetched from the shared store when it is asked for."""
    from flows.operate import serve_files
    from flows.publish import ui_file
    from flows.server import HOST, api_url, free_port, start_server, stop_server, wait_healthy
    from tasks.core.remote import open_store
    from tasks.core.store import RemoteError

    cfg = run_config(config, set_, artifacts)
    root = cfg.run.artifacts_root
    root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server and files cleanly on SIGTERM too
    log = root / ".prefect-server.log"
    server = start_server(port, None, log)
    try:
        store = open_store(cfg.run) if cfg.run.store else None
    except RemoteError as err:
        error(err.message)
        raise typer.Exit(2) from None
    files = serve_files(root, files_port or free_port(), store)
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


def _check_webhook(url: str | None) -> None:
    if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        error(f"webhook {url!r}: expected an http(s) URL")
        raise typer.Exit(2)


def worker(
    pool: Annotated[str, typer.Option("--pool", help="Work pool to serve (created as a process pool if missing)")],
    gpus: Annotated[str | None, typer.Option("--gpus", help=GPUS_HELP)] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            "--artifacts",
            help="This machine's artifact root for every run the workers take (with "
            "run.store, its cache of the shared store); default: the root each run names",
        ),
    ] = None,
):
    """Start one Prefect process worker per GPU (or group of GPUs), each running one flow run at a time on its own
    GPUs, and supervise them: Ctrl-C or SIGTERM stops them all and says what happened to the runs in flight."""
    if not os.environ.get("PREFECT_API_URL"):
        error("workers and the runs they take need one Prefect server: set PREFECT_API_URL (`boothflow ui` starts one)")
        raise typer.Exit(2)
    groups = _gpu_groups(gpus)
    from flows.sweep import GPU_LIMIT, gpu_limit
    from flows.workers import start_workers, stop_workers, visible_gpus

    groups = [[gpu] for gpu in visible_gpus()] if groups is None else groups
    slots = gpu_limit(at_least=max(len(groups), 1))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the workers as Ctrl-C does
    # Started in the background (`cmd &`, nohup), a process inherits SIGINT ignored, and Python then leaves it so:
    # Ctrl-C's signal would stop nothing, here or in the workers (a handled signal is reset to the default at exec).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workers = start_workers(pool, groups, artifacts.expanduser().resolve() if artifacts else None)
    for started in workers:
        where = f"CUDA_VISIBLE_DEVICES={started.gpu}" if started.gpu is not None else "no GPU"
        console.print(f"worker {started.name} on pool {pool}: {where}; work queue {', '.join(started.queues)}",
                      highlight=False, markup=False)  # fmt: skip
    console.print(f"concurrency limit {GPU_LIMIT}: {slots} slots; Ctrl-C stops the workers", highlight=False,
                  markup=False)  # fmt: skip
    exited = None
    try:
        while exited is None:
            time.sleep(1)
            exited = next((w for w in workers if w.process.poll() is not None), None)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for line in stop_workers(workers):
            console.print(line, highlight=False, markup=False)
    if exited is not None:
        error(f"worker {exited.name} exited with code {exited.process.returncode}; the others were stopped")
        raise typer.Exit(1)
    console.print(f"stopped {len(workers)} workers", highlight=False, markup=False)


def _gpu_groups(gpus: str | None) -> list[list[str]] | None:
    """`0,1,2+3` -> [['0'], ['1'], ['2', '3']]: one worker per group; device indices or UUIDs, each once."""
    if gpus is None:
        return None
    groups = [[gpu.strip() for gpu in part.split("+")] for part in gpus.split(",")]
    ids = [gpu for group in groups for gpu in group]
    if not all(re.fullmatch(r"[A-Za-z0-9-]+", gpu) for gpu in ids) or len(set(ids)) < len(ids):
        error(f"--gpus {gpus!r}: expected GPU indices or UUIDs, each once, e.g. 0,1,2,3 or 0,1,2+3")
        raise typer.Exit(2)
    return groups
