"""How a run on another machine is judged by its heartbeats: heartbeat events posted to a real Prefect server at
chosen moments of a run's life, judged at a chosen moment. Silence proves nothing, a stale last beat means the
machine is gone, a slow beater is not misjudged, and a rerun's old beats do not count."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prefect import flow
from prefect.events.filters import EventFilter, EventResourceFilter
from prefect.events.schemas.events import Event
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Running
from prefect_api import client_for, wait_for

from flows.liveness import HEARTBEAT, heartbeats_stopped
from flows.server import HEARTBEAT_SECONDS


@flow(name="liveness-probe")
def probe() -> None:
    """Never runs: its flow runs are only put in the Running state."""


def _beat(client, flow_run, at: list[float]) -> None:
    """Heartbeats of `flow_run` at these seconds after it became Running (before, when negative), once the server
    shows them."""
    since, resource = flow_run.state.timestamp, {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}"}
    beats = [Event(event=HEARTBEAT, resource=resource, occurred=since + timedelta(seconds=s)) for s in at]
    client.request("POST", "/events", json=[beat.model_dump(mode="json") for beat in beats])
    mine = EventFilter(resource=EventResourceFilter(id=[resource["prefect.resource.id"]]))
    mine.occurred.since, mine.occurred.until = since - timedelta(hours=1), since + timedelta(hours=1)
    wait_for(lambda: len(client.read_events(mine, limit=50).events) >= len(beats), 60, "the heartbeats stored")


@pytest.mark.parametrize(
    ("judged_at", "beats", "gone"),
    [
        (600, [], False),  # none at all: a server that keeps no events, or a run not beating yet
        (600, [10, 30], True),  # its last beat 570 s before: four beats of 30 s long missed
        (600, [540, 580], False),  # beating
        (600, [200, 380], False),  # a machine set to beat every 180 s: 220 s is not four of its beats
        (130, [10, 30], False),  # 100 s since its last beat: not yet four of 30 s
        (60, [-590, -570], False),  # Running again (a rerun): its first attempt's beats do not count
    ],
)
def test_a_run_is_gone_once_it_missed_four_of_its_heartbeats_since_it_became_running(
    prefect_server: str, judged_at: float, beats: list[float], gone: bool
) -> None:
    beating = temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_SECONDS})  # as the CLI sets it
    with beating, client_for(prefect_server) as client:
        flow_run = client.create_flow_run(probe)
        client.set_flow_run_state(flow_run.id, Running(), force=True)
        flow_run = client.read_flow_run(flow_run.id)
        if beats:
            _beat(client, flow_run, beats)
        reason = heartbeats_stopped(client, flow_run, now=flow_run.state.timestamp + timedelta(seconds=judged_at))
    assert (reason is not None) == gone, reason
    if gone:
        last = flow_run.state.timestamp + timedelta(seconds=30)
        assert reason == f"its machine is gone: no heartbeat since {last:%H:%M:%S} UTC, 4 of every 30 s missed"
