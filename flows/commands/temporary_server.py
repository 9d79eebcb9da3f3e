"""Which Prefect server a command's runs report to: PREFECT_API_URL's, or a temporary one that lives exactly as long
as this process. Prefect starts one by itself otherwise, but that one outlives a killed process."""

from __future__ import annotations

import atexit
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import typer

from flows.commands.common import console, error
from flows.server import TEMPORARY_SERVER, api_url, free_port, start_server, stop_server, wait_healthy

START_TIMEOUT = 120  # seconds; a first start on a fresh PREFECT_HOME migrates its database


def server_line() -> str:
    url = os.environ.get("PREFECT_API_URL")
    return f"reporting to Prefect server {url}" if url else "no PREFECT_API_URL: using a temporary local Prefect server"


def report_to_server() -> Callable[[], None]:
    """PREFECT_API_URL's server, or a temporary one. That one boots while the caller checks the config and imports
    the flow; the returned function waits until it answers."""
    if os.environ.get("PREFECT_API_URL"):
        return partial(console.print, server_line(), highlight=False, markup=False)
    log = Path(tempfile.gettempdir()) / f"boothflow-prefect-server-{os.getpid()}.log"
    wait = start_temporary_server(log)

    def ready() -> None:
        console.print("no PREFECT_API_URL: starting a temporary local Prefect server for this run", highlight=False)
        try:
            wait()
        except RuntimeError:
            error(f"the temporary Prefect server did not start (its log: {log}); set PREFECT_API_URL to a running "
                  "server")  # fmt: skip
            raise typer.Exit(1) from None

    return ready


def start_temporary_server(log: Path) -> Callable[[], None]:
    """A temporary server for this process's runs: PREFECT_API_URL points at it from here on, and it stops at exit,
    after Prefect has sent its last logs. Call it before importing Prefect, which reads its settings once. The server
    boots while this process checks and imports; the returned function waits until it answers (a RuntimeError if it
    never does, its log then kept)."""
    port = free_port()
    server = start_server(port, None, log, temporary=True)
    os.environ["PREFECT_API_URL"] = api_url(port)
    os.environ[TEMPORARY_SERVER] = "1"  # no build lock across machines: none reaches this server
    atexit.register(log.unlink, missing_ok=True)
    atexit.register(stop_server, server)  # runs first: atexit is last in, first out

    def wait() -> None:
        try:
            wait_healthy(server, api_url(port), START_TIMEOUT, log)
        except RuntimeError:
            atexit.unregister(log.unlink)
            raise

    return wait
