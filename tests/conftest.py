"""Session fixtures: one real Prefect server on 127.0.0.1, a helper to run the `boothflow` CLI against it, and an
environment for runs that start their own temporary server. Every process a test starts ends through processes.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from object_store import moto_endpoint
from processes import run, stop

from flows.server import api_url, free_port, start_server, wait_healthy

# One torch thread in every process of the suite, training children included (train.cpu_threads follows
# OMP_NUM_THREADS where unset): two pytest workers share two cores, and a process of two threads beside a busy one
# waits at each op for a thread that is not running (toy training ran 3-4x slower). Every figure the suite checks is
# measured at one thread. Set before any test imports torch; every process a test starts inherits it.
os.environ["OMP_NUM_THREADS"] = "1"
# libgomp's threads spin 300,000 times at a barrier before they sleep; for the few processes that still run two threads
# (a benchmark's quick mode, test_distributed's encoding) a short spin keeps them from burning the other worker's core.
# Waiting does not change any result.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# A lease whose holder died is revoked by the server's repossessor, which looks every 15 s by default; every 2 s here,
# so a test that waits for a dead machine's lease (a minute at least) waits for little more than the lease.
os.environ.setdefault("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "2")
# A suite started in the background (`make test &`) inherits SIGINT ignored, and so would every process a test starts:
# the Prefect workers and `boothflow worker` the tests stop with SIGINT would ignore it. A handled signal is reset to
# the default when a child starts.
signal.signal(signal.SIGINT, signal.default_int_handler)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT = 120
SERVER_FIXTURES = {"prefect_server", "cli_env", "boothflow", "migrated_database", "ephemeral_env", "fleet"}


# `make test` runs the suite on two pytest-xdist workers, one torch thread each (35 minutes on two threads, 22 on one;
# beside a third worker the cores were idle 0.5% of the time, so it has nothing to gain). A module is one unit of work:
# its module fixtures are built once, on one worker. The modules that share the toy DreamBooth root are one unit too,
# so its training happens once. The slowest units (worker-seconds in a two-worker run: toy 405, fleet 310 (half of it
# waiting on a dead machine's heartbeats), subjects 271, sweep 212, operate 168, preprocess flows 160, shared store
# 155, train flows 124) start first: the suite ends when its last unit does.
SLOWEST_FIRST = (
    "toy",
    "test_fleet",
    "test_subjects",
    "test_sweep",
    "test_operate",
    "test_flow_preprocess",
    "test_flow_train",
    "test_shared_store",
)


def _unit(item: pytest.Item) -> str:
    return "toy" if "toy_root" in item.fixturenames else item.module.__name__


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the units from the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a Prefect server, through any of the fixtures that start or name one, is a `server` test;
    each test is marked with its unit of work (`xdist_group`), and the slowest units come first."""
    for item in items:
        if SERVER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.server)
        item.add_marker(pytest.mark.xdist_group(_unit(item)))
    rank = {unit: place for place, unit in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item), len(rank)))  # stable: each unit keeps its order


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `prefect server start` for the whole session; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port, log = free_port(), home / "server.log"
    server = start_server(port, home, log)
    try:
        wait_healthy(server, api_url(port), SERVER_START_TIMEOUT, log)
        yield api_url(port)
    except RuntimeError as err:
        pytest.fail(str(err))
    finally:
        stop(server)


@pytest.fixture(scope="session")
def cli_env(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for CLI subprocesses: report to the session's server, with a private Prefect home."""
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-client-home")),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
def boothflow(cli_env: dict[str, str]):
    """Run `boothflow ARGS...` in the repository root; returns the finished process (output captured)."""

    def boothflow_run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = run(
            [BIN / "boothflow", *args],
            cwd=REPO,
            env={**cli_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and proc.returncode != 0:
            command = " ".join(map(str, args))
            raise AssertionError(f"boothflow {command} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        return proc

    return boothflow_run


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 with the bucket `boothflow-test`, for the whole session: its URL."""
    with moto_endpoint() as url:
        yield url


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact root for the tests that run configs/toy.toml: the toy images' preprocessing, the 100 class images,
    the latents and the training with prior preservation are made once (the pick test's settings differ only in what
    train does not key); each test's other settings key what follows."""
    return tmp_path_factory.mktemp("toy-sd")


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Prefect database with every migration applied: creating one takes seconds, copying it none."""
    home = tmp_path_factory.mktemp("migrated-prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home)}
    run([BIN / "prefect", "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True,
        timeout=SERVER_START_TIMEOUT)  # fmt: skip
    return home / "prefect.db"


@pytest.fixture
def ephemeral_env(migrated_database: Path, tmp_path: Path) -> dict[str, str]:
    """No PREFECT_API_URL: boothflow starts its own temporary server, in a private home whose database exists, as a
    user's does after their first run."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    shutil.copy(migrated_database, home / "prefect.db")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    return env
