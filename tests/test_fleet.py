"""A fleet on this box: one Prefect server on PostgreSQL, one S3 endpoint (moto's server) and two machines, a and b,
each a `boothflow worker` with its own artifact root and its own HOME, sharing nothing but the server (which is also
the lock service: flows/fleet.py) and the store. Nights are started from a third machine's environment, the desk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
import s3fs
from object_store import BUCKET, S3_CREDENTIALS
from postgres import postgresql
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect_api import client_for, wait_for
from processes import run, start, stop
from store_views import checkpoints, training

from flows.liveness import MISSED
from flows.server import HEARTBEAT_SECONDS, api_url, free_port, start_server, wait_healthy

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "fleet"
DEMO = sorted((REPO / "data" / "demo").iterdir())
SETTINGS = ["generate.steps=2", "generate.seeds=[0]", "generate.prompts=['a photo of {token} {class}']",
            "generate.compare_base=false", "data.settle_minutes=0", "prior.enabled=true", "prior.num_images=4",
            "prior.steps=2"]  # fmt: skip
QUICK = ["train.steps=3", "train.checkpoint_every=0", "train.sample_every=0"]
RESUMABLE = ["train.steps=8", "train.checkpoint_every=2", "train.sample_every=4"]
HELD_AT = "train:uploaded-step-000004"


@dataclass
class Fleet:
    api: str
    store: list[str]  # the `--set`s naming the shared store
    url: str
    endpoint: str
    env: dict[str, dict[str, str]]  # each machine's environment: a, b and the desk
    roots: dict[str, Path]
    workers: dict[str, object]


def _environment(name: str, folder: Path, api: str) -> dict[str, str]:
    """A machine's environment: its own HOME and Prefect home, its own faults file; the fleet's server."""
    home = folder / f"{name}-home"
    home.mkdir()
    return {**os.environ, **S3_CREDENTIALS, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"),
            "PREFECT_API_URL": api, "BOOTHFLOW_FAULTS": str(folder / f"{name}-faults.json"),
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def fleet(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("fleet")
    url = f"s3://{BUCKET}/fleet-{uuid.uuid4().hex[:8]}"
    store = ["--set", f"run.store='{url}'", "--set", f"run.store_options={{endpoint_url='{s3_endpoint}'}}"]
    with postgresql() as database:
        port, log = free_port(), folder / "server.log"
        server = start_server(port, folder / "server-home", log,
                              settings={"PREFECT_API_DATABASE_CONNECTION_URL": database})  # fmt: skip
        workers = {}
        try:
            wait_healthy(server, api_url(port), 180, log)
            env = {name: _environment(name, folder, api_url(port)) for name in ("a", "b", "desk")}
            roots = {name: folder / f"{name}-root" for name in ("a", "b", "desk")}
            for gpu, name in enumerate("ab"):  # fake device ids on CPU: they name the workers apart
                command = [BIN / "boothflow", "worker", "--pool", POOL, "--gpus", str(gpu), "--artifacts", roots[name]]
                workers[name] = start(command, log=folder / f"{name}-worker.log", cwd=REPO, env=env[name])
            with client_for(api_url(port)) as client:
                wait_for(lambda: _online(client) == 2, 180, "both machines' workers online")
            yield Fleet(api_url(port), store, url, s3_endpoint, env, roots, workers)
        finally:
            stop(*workers.values(), first=signal.SIGINT, grace=60)
            stop(server)


def _online(client) -> int:
    try:
        return len(client.read_workers_for_work_pool(POOL))
    except Exception:  # the pool is not there yet
        return 0


def _subject(folder: Path, name: str, images: list[Path]) -> None:
    (folder / name).mkdir(parents=True)
    for image in images:
        shutil.copy(image, folder / name / image.name)


def _night_command(fleet: Fleet, folder: Path, summary: Path, train: list[str], retries: int = 1) -> list:
    sets = [x for s in [*SETTINGS, *train] for x in ("--set", s)]
    return [BIN / "boothflow", "subjects", folder, "--config", "demo", "--pool", POOL, "--slots", "2", "--retries",
            str(retries), "--artifacts", fleet.roots["desk"], "--summary", summary, *sets, *fleet.store]  # fmt: skip


def _summaries(fleet: Fleet, flow_runs: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """Each subject's machine and the summary its run wrote in that machine's root."""
    found = {}
    for name, run_id in flow_runs.items():
        [machine] = [m for m in "ab" if (fleet.roots[m] / "runs" / run_id / "summary.json").is_file()]
        found[name] = machine, json.loads((fleet.roots[machine] / "runs" / run_id / "summary.json").read_text())
    return found


def test_a_night_of_four_subjects_on_two_machines_builds_every_entry_once(fleet: Fleet, tmp_path: Path) -> None:
    """One class-image entry for the class, one training per subject, across both machines; where a machine needed
    what the other built, its summary says `cached`."""
    folder = tmp_path / "subjects"
    for index, name in enumerate(("alice", "bob", "carol", "dave")):
        _subject(folder, name, DEMO[index : index + 3])
    done = run(_night_command(fleet, folder, tmp_path / "night.json", QUICK), cwd=REPO, env=fleet.env["desk"],
               capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    night = json.loads((tmp_path / "night.json").read_text())
    assert {row["subject"]: row["state"] for row in night["subjects"]} == dict.fromkeys(night["flow_runs"], "Completed")
    ran = _summaries(fleet, night["flow_runs"])
    assert {machine for machine, _ in ran.values()} == {"a", "b"}  # both machines took subjects

    built: dict[tuple[str, str], str] = {}  # each entry and the machine that built it
    builds: Counter[tuple[str, str]] = Counter()
    for machine, summary in ran.values():
        for stage, facts in summary["stages"].items():
            if facts["status"] == "ran":
                built[stage, facts["key"]] = machine
                builds[stage, facts["key"]] += 1
    assert set(builds.values()) == {1}, builds  # nothing built twice
    classes = {summary["stages"]["class_images"]["key"] for _, summary in ran.values()}
    assert len(classes) == 1 and builds["class_images", classes.pop()] == 1
    assert len({key for stage, key in builds if stage == "train"}) == 4
    elsewhere = [
        (machine, stage)
        for machine, summary in ran.values()
        for stage, facts in summary["stages"].items()
        if built.get((stage, facts.get("key"))) not in (None, machine)
    ]
    assert elsewhere and all(stage == "class_images" for _, stage in elsewhere), elsewhere
    for machine, summary in ran.values():
        for stage, facts in summary["stages"].items():
            if built.get((stage, facts.get("key"))) not in (None, machine):
                assert facts["status"] == "cached", (machine, stage, facts)


def _entries(root: Path) -> set[str]:
    return {str(path.parent.relative_to(root)) for path in root.glob("*/*/manifest.json")}


def _store_manifests(fleet: Fleet) -> set[str]:
    fs = s3fs.S3FileSystem(endpoint_url=fleet.endpoint, skip_instance_cache=True)
    return set(fs.glob(f"{fleet.url.removeprefix('s3://')}/entries/*/*.json"))


def _row(boothflow_runs: str, run_id: str) -> str:
    [row] = [line for line in boothflow_runs.splitlines() if run_id in line]
    return row


def _runs(fleet: Fleet, machine: str) -> str:
    done = run([BIN / "boothflow", "runs"], cwd=REPO, env=fleet.env[machine], capture_output=True, text=True,
               timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _crashed_row(fleet: Fleet, machine: str, run_id: str) -> str | None:
    row = _row(_runs(fleet, machine), run_id)
    if "Crashed" in row:
        return row
    time.sleep(10)  # each look starts a `boothflow` process
    return None


def test_a_machine_killed_holding_a_training_is_crashed_and_resumed_by_the_other_bit_for_bit(
    fleet: Fleet, tmp_path: Path
) -> None:
    """kim trains on one machine until its step-4 checkpoint is in the store, and holds there with its lease and its
    lock. The other machine's `cache gc` removes nothing of it; then its machine is SIGKILLed whole. The other
    machine's `runs` shows it Crashed (its heartbeats stopped), and its rerun lands on the other machine, resumes
    from the uploaded checkpoint and equals an uninterrupted training bit for bit."""
    folder = tmp_path / "subjects"
    _subject(folder, "kim", DEMO[1:4])
    faults = {m: Path(fleet.env[m]["BOOTHFLOW_FAULTS"]) for m in "ab"}
    for path in faults.values():
        path.write_text(json.dumps({"hold_at": HELD_AT}))
    command = _night_command(fleet, folder, tmp_path / "night.json", RESUMABLE, retries=0)  # the rerun is ours
    night = start(command, log=tmp_path / "night.log", cwd=REPO, env=fleet.env["desk"])
    try:
        held = wait_for(lambda: [m for m in "ab" if list(faults[m].parent.glob(f"{faults[m].name}.held-*"))] or
                        night.poll() is not None, 600, "kim's step-4 checkpoint in the store")  # fmt: skip
        assert night.poll() is None, (tmp_path / "night.log").read_text()[-3000:]
        [victim] = held
        survivor = "b" if victim == "a" else "a"
        faults[survivor].unlink()
        with client_for(fleet.api) as client:
            [kim] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["kim"])))
        run_id = str(kim.id)
        [key] = {name.split("/")[0] for name in checkpoints(fleet.endpoint, fleet.url)}
        assert checkpoints(fleet.endpoint, fleet.url) == [f"{key}/samples/step-000004.json", f"{key}/step-000004.json"]
        assert "Running" in _row(_runs(fleet, survivor), run_id)  # its heartbeats say it is alive

        victims, store = _entries(fleet.roots[victim]), _store_manifests(fleet)
        registered = set(json.loads((fleet.roots[victim] / "runs" / run_id / "keys.json").read_text()))
        gc = run([BIN / "boothflow", "cache", "gc", "--keep-last", "0", "--artifacts", fleet.roots[survivor]],
                 cwd=REPO, env=fleet.env[survivor], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert gc.returncode == 0, gc.stderr[-3000:]
        assert _entries(fleet.roots[survivor]) == set()  # its own machine's entries: no run of its own is running
        assert _entries(fleet.roots[victim]) == victims and _store_manifests(fleet) == store
        assert {k for k in registered if not k.startswith("train/")} <= victims  # all but the training it builds

        stop(fleet.workers[victim], first=signal.SIGKILL)  # the machine is gone, with everything it ran
        killed = time.monotonic()
        alone = tmp_path / "alone"  # the uninterrupted training, on a machine without the shared store
        sets = [x for s in [*SETTINGS, *RESUMABLE] for x in ("--set", s)]
        reference = run([BIN / "boothflow", "run", "--config", "demo", "--set",
                         f"data.instance_dir='{folder / 'kim'}'", *sets, "--artifacts", alone, "--summary",
                         tmp_path / "alone.json"], cwd=REPO, env=fleet.env["desk"], capture_output=True, text=True,
                        timeout=900)  # fmt: skip
        assert reference.returncode == 0, reference.stderr[-3000:]

        time.sleep(max(0.0, killed + MISSED * HEARTBEAT_SECONDS - time.monotonic()))  # the heartbeats it missed
        row = wait_for(lambda: _crashed_row(fleet, survivor, run_id), 120, "kim Crashed in `boothflow runs`")
        crashed_after = time.monotonic() - killed
        with client_for(fleet.api) as client:
            message = client.read_flow_run(UUID(run_id)).state.message
        assert "its machine is gone: no heartbeat since" in message, (row, message)
        assert night.wait(300) == 1, (tmp_path / "night.log").read_text()[-3000:]
        [row] = json.loads((tmp_path / "night.json").read_text())["subjects"]
        assert row["state"] == "Crashed", row
    finally:
        stop(night)

    rerun = run([BIN / "boothflow", "rerun", run_id], cwd=REPO, env=fleet.env[survivor], capture_output=True,
                text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with client_for(fleet.api) as client:
        done = wait_for(lambda: (r := client.read_flow_run(UUID(run_id))).state.is_final() and r, 600, "kim rerun")
    assert done.state.name == "Completed", done.state.message
    summary = json.loads((fleet.roots[survivor] / "runs" / run_id / "summary.json").read_text())
    train = summary["stages"]["train"]
    assert (train["status"], train["key"], train["items_cached"], train["items_processed"]) == ("ran", key, 4, 4)
    assert json.loads((tmp_path / "alone.json").read_text())["stages"]["train"]["key"] == key
    assert training(fleet.roots[survivor], key) == training(alone, key)  # every file to the byte, losses to the bit
    assert checkpoints(fleet.endpoint, fleet.url) == []  # committed: the resume state left the store
    print(f"kim was Crashed {crashed_after:.0f} s after its machine died")
