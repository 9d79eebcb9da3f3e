"""Starting a local Prefect server on 127.0.0.1 with its UI wired to the same port, and waiting until it is healthy.

Used by `boothflow ui`, runs without PREFECT_API_URL (flows/commands/temporary_server.py), the test suite and the
benchmarks; the port must be set through the environment, since `--port` alone leaves the UI calling port 4200.
Every server dies with the process that started it (tasks.core.lifeline), so a killed `boothflow` leaves none behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.core.lifeline import die_with_parent

HOST = "127.0.0.1"
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
TEMPORARY_SERVER = "BOOTHFLOW_TEMPORARY_SERVER"  # set by a command that started its own server, which no one shares
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"  # how often each flow run tells the server it is alive
HEARTBEAT_SECONDS = 30  # the shortest Prefect allows; at its default (180) a dead run looks alive for 12 min


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.read().strip() == b"true"
    except OSError:
        return False


def start_server(
    port: int, home: Path | None, log: Path, temporary: bool = False, settings: dict[str, str] | None = None
) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` (PREFECT_HOME `home`, or the user's), output into `log`.
    A temporary server runs as Prefect's own temporary server does (no UI; only the services that record runs,
    so no schedule of the user's deployments fires from it). Leases of concurrency slots are kept on the server's disk
    unless the environment says otherwise: in memory, a restart forgets them and a dead holder's slot stays taken.
    `settings`: more of Prefect's settings, e.g. the database (PREFECT_API_DATABASE_CONNECTION_URL)."""
    env = {
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILESYSTEM_LEASES,
        **os.environ,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(settings or {}),
    }
    if temporary:
        env |= {"PREFECT_UI_ENABLED": "false", "PREFECT__SERVER_EPHEMERAL": "1"}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).parent / "prefect"
    with log.open("w") as out:
        return subprocess.Popen(
            [prefect, "server", "start"], env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent()
        )


def wait_healthy(server: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    """Block until the API answers; raise with the log's tail if the server died or took too long."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"Prefect server at {url} did not start; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
