"""Operating boothflow with Prefect: the nightly deployment, reruns of failed runs, the run list, a local UI.

Thin wrappers over Prefect's own serve, client and flow engine, so the UI shows exactly what these commands did.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import urllib.parse
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import tzlocal
from prefect import get_client
from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.flow_engine import run_flow
from prefect.schedules import Cron
from prefect.states import AwaitingRetry, State

from flows.dreambooth import dreambooth, dreambooth_stage
from flows.liveness import artifacts_root, mark_crashed
from flows.records import read_summary
from flows.server import HOST
from flows.subjects import subjects
from flows.sweep import sweep
from tasks.core.config import RunConfig
from tasks.core.store import RemoteError, Store

SERVED_DEPLOYMENT = "nightly"
SUBJECTS_DEPLOYMENT = "nightly-subjects"
FLOWS = {flow.name: flow for flow in (dreambooth, dreambooth_stage, sweep, subjects)}


def local_timezone() -> str:
    """The machine's IANA zone (e.g. Europe/Berlin), so a cron means local time rather than silently UTC."""
    return tzlocal.get_localzone_name()


def serve_nightly(config: RunConfig, cron: str, timezone: str) -> None:
    """Serve the flow as a deployment on a cron schedule; the config is frozen into its parameters now."""
    dreambooth.serve(
        name=SERVED_DEPLOYMENT,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"config": config.model_dump(mode="json")},
        tags=["boothflow"],
        limit=1,
    )


def serve_subjects(parameters: dict[str, Any], cron: str, timezone: str) -> None:
    """Serve the subjects flow on a cron schedule: each night lists the folder anew; its parent run runs here, in this
    process, never on a GPU worker."""
    subjects.serve(
        name=SUBJECTS_DEPLOYMENT,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=parameters,
        tags=["boothflow"],
        limit=1,
    )


def mark_crashed_runs(limit: int = 50) -> None:
    """Check the latest runs: what `run`, `serve` and `runs` do first, so no dead run shows as Running."""
    with get_client(sync_client=True) as client:
        for flow_run in client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))), sort=FlowRunSort.START_TIME_DESC, limit=limit
        ):
            mark_crashed(client, flow_run)


NOTIFY_SUBJECT = "boothflow run {{ flow_run.name }} {{ flow_run.state.name }}"
NOTIFY_BODY = (
    "boothflow run {{ flow_run.name }} of {{ flow.name }}/{{ deployment.name }} ended {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}"
)


def notify_failed_nights(url: str, deployment: str = SERVED_DEPLOYMENT) -> UUID:
    """Through Prefect's API, an automation that posts to `url` when a run of the deployment named `deployment`
    fails or crashes: JSON `{"subject": ..., "text": ...}` with the run's name and its final state's message, which
    holds the failed stage and its one-line cause. Replaces the one an earlier call made for that deployment."""
    name = f"boothflow: a night of {deployment} failed"
    block = CustomWebhookNotificationBlock(
        name="boothflow", url=url, method="POST", json_data={"subject": "{{subject}}", "text": "{{body}}"}
    )
    block_id = block.save(f"boothflow-{deployment}-failed", overwrite=True)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name):
            client.delete_automation(old.id)
    automation = Automation(
        name=name,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "deployment", "prefect.resource.name": deployment},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=NOTIFY_SUBJECT, body=NOTIFY_BODY)],
    )
    return automation.create().id


def rerun(run_id: str) -> tuple[FlowRun, str, State | None]:
    """Retry a finished run under the same id: ad-hoc runs execute here and now; deployment runs are handed back to
    their `serve` process or worker, as the UI's Retry does. Cached stages are skipped, the failed one resumes.
    Returns the run, its flow's name and (when it ran here) its final state."""
    with get_client(sync_client=True) as client:
        flow_run = mark_crashed(client, client.read_flow_run(UUID(run_id)))
        flow = FLOWS[client.read_flow(flow_run.flow_id).name]
        client.set_flow_run_state(flow_run.id, AwaitingRetry(message="boothflow rerun"), force=True)
        flow_run = client.read_flow_run(flow_run.id)
    if flow_run.deployment_id is not None:
        return flow_run, flow.name, None
    return flow_run, flow.name, run_flow(flow=flow, flow_run=flow_run, parameters=flow_run.parameters,
                                         return_type="state")  # fmt: skip


def run_summary(flow_run: FlowRun) -> dict[str, Any] | None:
    """The summary a run wrote under its own artifact root, if it got far enough to write one."""
    root = artifacts_root(flow_run)
    return read_summary(root, str(flow_run.id)) if root is not None else None


def _crash_reason(flow_run: FlowRun) -> str:
    return (flow_run.state.message or "") if flow_run.state and flow_run.state.is_crashed() else ""


def recent_runs(limit: int) -> list[dict[str, Any]]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
            sort=FlowRunSort.START_TIME_DESC,
            limit=limit,
        )
        runs = [mark_crashed(client, flow_run) for flow_run in runs]
    rows = []
    for flow_run in runs:
        summary = run_summary(flow_run) or {}
        error = summary.get("error") or {}
        rows.append(
            {
                "id": str(flow_run.id),
                "name": flow_run.name,
                "run": (summary.get("run") or {}).get("name", ""),
                "state": flow_run.state.name if flow_run.state else "",
                "started": flow_run.start_time.strftime("%Y-%m-%d %H:%M") if flow_run.start_time else "",
                "attempts": flow_run.run_count,
                "failed stage": error.get("stage") or "",
                "cause": error.get("message") or _crash_reason(flow_run),
            }
        )
    return rows


class ArtifactFiles(SimpleHTTPRequestHandler):
    """The artifact root's files and nothing else: not its internal dot-folders (`.prefect`, `.locks`) or
    dot-files, and nothing a symlink inside it leads to outside it (404, as for a missing file). With a shared store,
    a file of an entry this root lacks (a report another machine made) is served once its entry is fetched."""

    store: Store | None = None

    def send_head(self):
        root = Path(self.directory).resolve()
        asked = Path(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        target = Path(self.translate_path(self.path)).resolve()
        if any(part.startswith(".") for part in asked.parts) or not target.is_relative_to(root):
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        if not target.exists() and self.store is not None and len(asked.parts) > 3:
            with contextlib.suppress(RemoteError, OSError):
                self.store.get(asked.parts[1], asked.parts[2])  # (stage, key): the whole entry, hash-checked
        return super().send_head()


def serve_files(root: Path, port: int, store: Store | None = None) -> ThreadingHTTPServer:
    """Serve the artifact root over http on 127.0.0.1, so report links from the Prefect UI open; with `store`, what
    its shared store holds too."""
    files = type("Files", (ArtifactFiles,), {"store": store})
    handler = functools.partial(files, directory=str(root))
    server = ThreadingHTTPServer((HOST, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
