"""Reading flow and task runs back from the test server through Prefect's own client, waiting on it, and a webhook
that records what an automation posts."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings


def task_states(api_url: str, flow_run_id: str) -> dict[str, str]:
    """Task name -> state name for the latest attempt of a flow run."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
        return {r.name.split("-")[0]: r.state.name for r in runs if r.flow_run_run_count == flow_run.run_count}


def run_logs(api_url: str, flow_run_id: str) -> list[str]:
    """Every log line the server holds for a flow run (its task runs' included), oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return [log.message for log in sorted(logs, key=lambda log: log.timestamp)]


@contextlib.contextmanager
def client_for(api: str) -> Iterator:
    """Prefect's sync client on the server at `api`."""
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def wait_for(predicate, timeout: float, what: str):
    """The first truthy value of `predicate()`, polled each second; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return value


def run_deployment_now(api: str, name: str) -> str:
    """Run deployment `name` now and wait (at most 4 minutes) until it ends; its flow run id."""
    from prefect.deployments import run_deployment

    with temporary_settings({PREFECT_API_URL: api}):
        return str(run_deployment(name, timeout=240).id)


@contextlib.contextmanager
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP server that records the JSON each POST sends it: its URL, and what it received in order."""
    received: list[dict] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()
