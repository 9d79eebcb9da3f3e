"""Reading flow and task runs back from the test server through Prefect's own client."""

from __future__ import annotations

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
