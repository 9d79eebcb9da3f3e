"""Whether a run Prefect shows as Running still has a process: a killed run, or one whose machine lost power, stays
Running on the server for good unless someone marks it Crashed.

Two witnesses. On the run's own host, its lock (flows/records.py): the kernel drops it the moment the process dies.
From any machine, Prefect's heartbeats: every flow run sends a `prefect.flow-run.heartbeat` event every
HEARTBEAT_SECONDS (the `boothflow` command sets that for itself and the workers it starts), so a run that has sent
none for MISSED beats is gone with its machine. `runs`, `rerun`, `serve`, `run` and a night or sweep waiting on its
runs ask.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.settings import get_current_settings
from prefect.states import Crashed

from flows.records import process_gone
from flows.server import HEARTBEAT_SECONDS
from tasks.core.config import ConfigError
from tasks.core.config_load import load_config

MISSED = 4  # heartbeats a live run may miss (a loaded machine, a slow network) before it counts as gone
HEARTBEAT = "prefect.flow-run.heartbeat"


def artifacts_root(flow_run: FlowRun) -> Path | None:
    """Where a run keeps its records: a run's config, a sweep's base config, or a night's config file and settings
    (None when those no longer load: such a night never started)."""
    parameters = flow_run.parameters
    if "folder" in parameters:  # a night of subjects
        config, artifacts = parameters.get("config"), parameters.get("artifacts")
        try:
            base = load_config(Path(config) if config else None, parameters.get("settings") or [],
                               Path(artifacts) if artifacts else None)  # fmt: skip
        except ConfigError:
            return None
        return base.run.artifacts_root
    config = parameters["spec"]["base"] if "spec" in parameters else parameters.get("config", {})
    return Path(config.get("run", {}).get("artifacts_root", "artifacts"))


def heartbeats_stopped(client: SyncPrefectClient, flow_run: FlowRun, now: datetime | None = None) -> str | None:
    """Why a running flow run is gone by its heartbeats: none for MISSED intervals since its last one, counting only
    those since it last became Running (a rerun's old beats do not count). The interval is the longer of this
    process's frequency and the gap between the run's last two beats, so a machine set to beat slower is not
    misjudged. None while it may be alive, and for a run with no heartbeat at all. `now`: when it is judged."""
    now = now or datetime.now(UTC)
    running_since = flow_run.state.timestamp
    beats = client.read_events(
        EventFilter(
            event=EventNameFilter(name=[HEARTBEAT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run.id}"]),
            occurred=EventOccurredFilter(since=running_since - timedelta(seconds=5), until=now + timedelta(minutes=1)),
        ),
        limit=2,
    ).events  # newest first
    if not beats:  # none yet, or a server that keeps no events: silence that proves nothing
        return None
    interval = float(get_current_settings().flows.heartbeat_frequency or HEARTBEAT_SECONDS)
    if len(beats) == 2:
        interval = max(interval, (beats[0].occurred - beats[1].occurred).total_seconds())
    last = beats[0].occurred
    if (now - last).total_seconds() < MISSED * interval:
        return None
    return f"its machine is gone: no heartbeat since {last:%H:%M:%S} UTC, {MISSED} of every {interval:.0f} s missed"


def mark_crashed(client: SyncPrefectClient, flow_run: FlowRun) -> FlowRun:
    """A run Prefect still shows as running whose process is gone becomes Crashed, with the reason; any other run
    is returned as it is."""
    if flow_run.state is None or not flow_run.state.is_running():
        return flow_run
    root = artifacts_root(flow_run)
    reason = process_gone(root, str(flow_run.id)) if root is not None else None
    reason = reason or heartbeats_stopped(client, flow_run)
    if reason is None:
        return flow_run
    client.set_flow_run_state(flow_run.id, Crashed(message=reason), force=True)
    return client.read_flow_run(flow_run.id)
