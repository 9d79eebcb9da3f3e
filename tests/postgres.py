"""A PostgreSQL server the tests start on 127.0.0.1, for a Prefect server a fleet shares. PostgreSQL refuses to run
as root, so as root its programs run as the `postgres` user, in a folder that user owns."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from processes import run, started

from flows.server import free_port

HOST = "127.0.0.1"


def _programs() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    assert found, "PostgreSQL is not installed: apt-get install -y postgresql (.ci/run does)"
    return found[-1].parent


@contextlib.contextmanager
def postgresql() -> Iterator[str]:
    """A fresh database cluster with a database `prefect`; yields its URL for PREFECT_API_DATABASE_CONNECTION_URL.
    The server stops (fast shutdown, then SIGKILL) and its folder goes when the block ends, however."""
    programs, folder = _programs(), Path(tempfile.mkdtemp(prefix="boothflow-postgres-"))
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_owner:
        shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"
    try:
        run([*as_owner, programs / "initdb", "-D", data, "-A", "trust", "-U", "prefect"], timeout=120, check=True,
            capture_output=True)  # fmt: skip
        server = [*as_owner, programs / "postgres", "-D", data, "-p", port, "-k", folder, "-c",
                  f"listen_addresses={HOST}"]  # fmt: skip
        with started(server, first=signal.SIGINT, log=folder / "log"):  # SIGINT: PostgreSQL's fast shutdown
            created = None
            for _ in range(60):  # the server accepts connections within seconds
                created = run([*as_owner, programs / "createdb", "-h", HOST, "-p", port, "-U", "prefect", "prefect"],
                              timeout=30, capture_output=True)  # fmt: skip
                if created.returncode == 0:
                    break
                time.sleep(0.5)
            assert created is not None and created.returncode == 0, (folder / "log").read_text()[-3000:]
            yield f"postgresql+asyncpg://prefect@{HOST}:{port}/prefect"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
