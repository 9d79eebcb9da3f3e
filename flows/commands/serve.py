"""Long-lived commands: serving the nightly deployment (`serve`), its failure webhook (`notify`) and a local Prefect
server with its UI (`ui`)."""

from __future__ import annotations

import json
import signal
import sys
import urllib.parse
from typing import Annotated

import typer

from flows.commands.common import ArtifactsOpt, ConfigOpt, MemoryOpt, SetOpt, console, error, run_config
from flows.commands.temporary_server import server_line


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

    cfg = run_config(config, set_, artifacts, device_memory)
    _check_webhook(notify)
    zone = timezone or local_timezone()
    console.print(server_line(), highlight=False, markup=False)
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
):
    """Start a local Prefect server with its UI on 127.0.0.1 and serve the artifact root for report links."""
    from flows.operate import serve_files
    from flows.publish import ui_file
    from flows.server import HOST, api_url, free_port, start_server, stop_server, wait_healthy

    cfg = run_config(None, [], artifacts)
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


def _check_webhook(url: str | None) -> None:
    if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        error(f"webhook {url!r}: expected an http(s) URL")
        raise typer.Exit(2)
