"""A subjects folder on a work pool served by `boothflow worker --gpus 0,1,2+3` (fake device ids on CPU): each subject
runs on one worker, pinned to its GPUs even against the pool's job variables, and a subject of two training processes
on the worker with two GPUs; the second night trains only what
changed; the summary page holds in a browser; a deployment of the subjects flow lists the folder when it runs; a
folder with no usable image fails alone and the webhook names it; fp16 is checked where the subject runs."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import psutil
import pytest
from browser import chromium
from PIL import Image
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolUpdate
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from prefect_api import client_for, run_deployment_now, wait_for, webhook
from processes import REAPED, start, stop

from tasks.core.subjects import list_subjects

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "subjects-test-pool"
# The photos are copied just before each night: none of them is still arriving (data.settle_minutes).
QUICK = ["train.steps=3", "train.checkpoint_every=0", "train.sample_every=0", "generate.steps=2", "generate.seeds=[0]",
         "generate.prompts=['a photo of {token} {class}']", "generate.compare_base=false",
         "data.settle_minutes=0"]  # fmt: skip
DEMO = sorted((REPO / "data" / "demo").iterdir())
STOPPED = 120  # seconds `boothflow worker` may take to stop its workers after Ctrl-C (its own grace is 20 s)


def _subject(root: Path, name: str, images: list[Path], settings: str = "") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    if settings:
        (folder / "subject.toml").write_text(settings)
    return folder


def _sets() -> list[str]:
    return [x for s in QUICK for x in ("--set", s)]


@pytest.fixture(scope="module")
def workers(cli_env: dict, prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`boothflow worker --gpus 0,1,2+3`, started as in the background, on a pool whose job variables set
    CUDA_VISIBLE_DEVICES=7 for every run; the last test stops it with Ctrl-C's signal, and whatever is left is stopped
    at the end."""
    log = tmp_path_factory.mktemp("workers") / "worker.log"
    faults = log.with_name("faults.json")  # every run on the pool reads it; a test writes it, a kill `once` removes it
    env = {**cli_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONFAULTHANDLER": "1"}
    supervisor = start([BIN / "boothflow", "worker", "--pool", POOL, "--gpus", "0,1,2+3"], log=log, cwd=REPO, env=env,
                       preexec_fn=_as_in_the_background)  # fmt: skip
    started: list[psutil.Process] = []  # the workers, each in its own session
    try:
        with client_for(prefect_server) as client:
            pool = wait_for(lambda: _pool(client), 180, "the pool the workers create")
            template = pool.base_job_template
            template["variables"]["properties"]["env"]["default"] = {"CUDA_VISIBLE_DEVICES": "7",
                                                                     "BOOTHFLOW_FAULTS": str(faults)}  # fmt: skip
            client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=template))
            wait_for(lambda: len(client.read_workers_for_work_pool(POOL)) == 3, 180, "three workers online")
        started += psutil.Process(supervisor.pid).children()
        yield {"log": log, "env": env, "supervisor": supervisor, "faults": faults}
    finally:
        stop(supervisor, first=signal.SIGINT)
        for worker in started:  # a supervisor that died without stopping them would leave them and their runs
            with contextlib.suppress(psutil.Error):
                for proc in [*worker.children(recursive=True), worker]:
                    proc.kill()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact root for the module's nights: a subject another test trained is served from the store."""
    return tmp_path_factory.mktemp("subjects-artifacts")


def _as_in_the_background() -> None:
    """What `boothflow worker &` or nohup does to the process: SIGINT ignored, which its workers would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool(client):
    try:
        return client.read_work_pool(POOL)
    except Exception:
        return None


def _night(boothflow, folder: Path, root: Path, summary: Path, check: bool = True):
    done = boothflow("subjects", folder, "--config", "demo", "--pool", POOL, "--artifacts", root, "--summary",
                     summary, *_sets(), check=check)  # fmt: skip
    return done, {row["subject"]: row for row in json.loads(summary.read_text())["subjects"]}


def _prompts(report: Path) -> set[str]:
    return {sample["prompt"] for sample in json.loads(report.with_name("report.json").read_text())["samples"]}


def _trained(row: dict) -> bool:
    return any(s["stage"] == "train" and s["status"] == "ran" for s in row["stages"])


def _all_cached(row: dict) -> bool:
    return bool(row["stages"]) and {s["status"] for s in row["stages"]} == {"cached"}


def test_a_subjects_folder_on_two_gpu_workers_retrains_only_what_changed(
    boothflow, workers: dict, root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "subjects"
    _subject(folder, "alice", DEMO[:4])
    _subject(folder, "bob", DEMO[1:5], '[data]\ntoken = "zwx"\n[train]\nnum_processes = 2\n')
    _subject(folder, "carol", DEMO[2:6])
    _, first = _night(boothflow, folder, root, tmp_path / "first.json")
    assert {name: row["state"] for name, row in first.items()} == dict.fromkeys(("alice", "bob", "carol"), "Completed")
    host = socket.gethostname().split(".")[0]
    for name in ("alice", "carol"):
        row = first[name]
        assert row["gpu"] in ("0", "1") and row["worker"] == f"{host}-gpu{row['gpu']}", row  # not the pool's "7"
    assert (first["bob"]["gpu"], first["bob"]["worker"]) == ("2,3", f"{host}-gpu2+3")  # two processes, two GPUs
    page = Path(json.loads((tmp_path / "first.json").read_text())["summary"])
    prompts = {name: _prompts(page.parent / row["report"]) for name, row in first.items()}
    assert "a photo of zwx toy" in prompts["bob"] and "a photo of sks toy" in prompts["alice"]  # bob's subject.toml

    Image.open(folder / "alice" / DEMO[0].name).rotate(90, expand=True).save(folder / "alice" / DEMO[0].name)
    _subject(folder, "dave", DEMO[:3] + DEMO[4:])
    _, second = _night(boothflow, folder, root, tmp_path / "second.json")
    assert {name for name, row in second.items() if _trained(row)} == {"alice", "dave"}
    assert _all_cached(second["bob"]) and _all_cached(second["carol"]), second
    assert (second["bob"]["worker"], second["carol"]["worker"]) == ("", "")  # served by the night itself: no GPU
    assert {second["alice"]["gpu"], second["dave"]["gpu"]} <= {"0", "1"}
    assert all(row["state"] == "Completed" for row in second.values())

    page = Path(json.loads((tmp_path / "second.json").read_text())["summary"])
    with chromium() as browser:
        view = browser.new_page(viewport={"width": 1280, "height": 900})
        view.goto(page.as_uri(), wait_until="load")
        widths = view.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        rows = view.eval_on_selector_all("#subjects tbody tr", "rows => rows.map(r => r.innerText)")
        links = view.eval_on_selector_all("#subjects a", "links => links.map(a => a.href)")
    assert widths[0] == widths[1] == 1280, widths
    assert len(rows) == 4 and all(re.search(r"preprocess: (ran \d+|cached)", row) for row in rows), rows
    assert len(links) == 4 and all(Path(link.removeprefix("file://")).is_file() for link in links)


def test_a_deployed_night_lists_the_folder_when_it_runs_and_a_failed_subject_fails_alone(
    workers: dict, prefect_server: str, root: Path, tmp_path: Path
) -> None:
    """The subjects with photos are those of the first night above, so they come from the store."""
    folder = tmp_path / "subjects"
    _subject(folder, "alice", DEMO[:4])
    _subject(folder, "carol", DEMO[2:6])
    (_subject(folder, "empty", []) / "notes.txt").write_text("no photos yet")
    with webhook() as (notify, received):
        command = [BIN / "boothflow", "serve", "--subjects", folder, "--config", "demo", "--pool", POOL, "--artifacts",
                   root, "--notify", notify, *_sets()]  # fmt: skip
        serve = start(
            command, log=tmp_path / "serve.log", cwd=REPO, env={**workers["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        )
        try:
            with client_for(prefect_server) as client:
                wait_for(lambda: _deployment(client), 90, "the served subjects deployment")
            first = run_deployment_now(prefect_server, "dreambooth-subjects/nightly-subjects")
            [posted] = wait_for(lambda: received, 120, "the failed night's webhook")
            _subject(folder, "erin", DEMO[2:6])
            second = run_deployment_now(prefect_server, "dreambooth-subjects/nightly-subjects")
        finally:
            stop(serve)
    nights = [json.loads((root / "runs" / run / "night.json").read_text())["subjects"] for run in (first, second)]
    assert [row["subject"] for row in nights[0]] == ["empty", "alice", "carol"]  # the failed subject first
    assert [row["subject"] for row in nights[1]] == ["empty", "alice", "carol", "erin"]  # listed when it ran
    failed = nights[0][0]
    assert failed["state"] == "Failed" and "only 0 usable images" in failed["cause"] and "\n" not in failed["cause"]
    assert failed["tries"] == 1  # bad photos: trying again changes nothing
    assert [row["state"] for row in nights[0][1:]] == ["Completed", "Completed"]
    assert all(_all_cached(row) for row in nights[0][1:] + nights[1][1:3]), nights  # the first test trained them
    erin = {stage["stage"]: stage["status"] for stage in nights[1][3]["stages"]}
    assert erin.pop("report") == "ran" and set(erin.values()) == {"cached"}  # carol's photos: only its own page
    assert "1 of 3 subjects failed: empty (preprocess" in posted["text"], posted


def _deployment(client):
    try:
        return client.read_deployment_by_name("dreambooth-subjects/nightly-subjects")
    except Exception:
        return None


def test_fp16_is_checked_on_the_worker_and_a_crashed_subject_is_tried_again_within_the_night(
    boothflow, workers: dict, root: Path, tmp_path: Path
) -> None:
    """This machine has no CUDA, so a check on the submitting side would refuse fp16 before anything ran; the
    subject reaches a worker instead, and fails there, in one line, once. Beside it, the process of another subject's
    run is killed mid-preprocess: the night sends that run back to the pool, and it completes."""
    folder = tmp_path / "subjects"
    _subject(folder, "half", DEMO[:4], '[train]\nmixed_precision = "fp16"\n')
    crashy = _subject(folder, "crashy", DEMO[3:6])
    Image.open(DEMO[3]).rotate(180).save(crashy / "turned.png")  # one image no other subject has: preprocess commits it
    workers["faults"].write_text(json.dumps({"kill_at": "preprocess-items:after-1", "once": True}))
    try:
        done, rows = _night(boothflow, folder, root, tmp_path / "night.json", check=False)
    finally:
        workers["faults"].unlink(missing_ok=True)
    assert done.returncode == 1, done.stderr
    half, crashy = rows["half"], rows["crashy"]
    assert half["worker"].endswith(("-gpu0", "-gpu1")), half  # it ran on a worker
    assert half["cause"].startswith("plan: train.mixed_precision asks for fp16, which needs a CUDA GPU"), half
    assert half["tries"] == 1  # an expected failure is not retried
    assert (crashy["state"], crashy["tries"]) == ("Completed", 2) and _trained(crashy), crashy
    assert "Completed (2 tries)" in done.stdout


def test_a_subject_whose_settings_do_not_load_fails_alone_and_a_bad_night_stops_first(
    boothflow, tmp_path: Path
) -> None:
    folder = tmp_path / "subjects"
    _subject(folder, "fine", DEMO[:3], '[data]\ntoken = "zwx"\n')
    _subject(folder, "settled", DEMO[:3], "[data]\nsettle_minutes = 0\n")
    _subject(folder, "broken", DEMO[:3], "[data\ntoken = 1")
    _subject(folder, "unknown", DEMO[:3], "[train]\nstepz = 3\n")
    _subject(folder, "moved", DEMO[:3], '[data]\ninstance_dir = "/elsewhere"\n')
    _subject(folder, "bad name!", DEMO[:3])
    _subject(folder, ".cache", DEMO[:3])
    base, found = list_subjects(folder, Path("demo"), ["train.steps=7"], tmp_path / "artifacts")
    problems = {subject.name: subject.problem for subject in found}
    assert list(problems) == ["bad name!", "broken", "fine", "moved", "settled", "unknown"]  # hidden ones are not
    assert problems["fine"] is None and base.train.steps == 7
    fine, settled = (next(subject.config for subject in found if subject.name == name) for name in ("fine", "settled"))
    assert (fine.data.settle_minutes, settled.data.settle_minutes, base.data.settle_minutes) == (5, 0, None)
    assert (fine.data.token, fine.train.steps, fine.run.name) == ("zwx", 7, "fine")
    assert fine.data.instance_dir == (folder / "fine").resolve()
    assert "subject.toml: not valid TOML" in problems["broken"]
    assert "unknown setting 'train.stepz'" in problems["unknown"]
    assert "data.instance_dir is set by the subjects folder" in problems["moved"]
    assert "its name becomes the run's" in problems["bad name!"]

    missing = boothflow("subjects", tmp_path / "nowhere", "--config", "demo", check=False)
    assert missing.returncode == 2 and "does not exist; give a folder with one subfolder per subject" in missing.stderr
    flat = boothflow("subjects", folder / "fine", "--config", "demo", check=False)  # photos, not subject folders
    assert flat.returncode == 2 and "has no subfolders: give a folder with one subfolder of images" in flat.stderr
    slots = boothflow("subjects", folder, "--slots", "2", check=False)
    assert slots.returncode == 2 and "it needs --pool" in slots.stderr
    gpus = boothflow("worker", "--pool", POOL, "--gpus", "0,0", check=False)
    assert gpus.returncode == 2 and "--gpus '0,0': expected GPU indices or UUIDs, each once" in gpus.stderr
    for done in (missing, flat, slots, gpus):
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_ctrl_c_stops_every_worker_and_marks_the_run_it_cut_short_crashed(
    workers: dict, prefect_server: str, root: Path, tmp_path: Path
) -> None:
    """Runs last: a long subject is in flight on a worker when `boothflow worker` gets Ctrl-C. It holds a limit of
    its own: the slot of a killed run is leased until the lease expires (minutes), which would hold up the suite's
    other users of boothflow-gpu."""
    _subject(tmp_path / "subjects", "long", DEMO[:4])
    limit = "subjects-ctrl-c"
    command = [BIN / "boothflow", "subjects", tmp_path / "subjects", "--config", "demo", "--pool", POOL, "--artifacts",
               root, *_sets(), "--set", "train.steps=5000", "--set", f"run.concurrency_limit={limit}"]  # fmt: skip
    supervisor = workers["supervisor"]
    with client_for(prefect_server) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    night = start(command, log=tmp_path / "night.log", cwd=REPO, env=workers["env"])
    try:
        with client_for(prefect_server) as client:
            running = wait_for(lambda: _running(client, "long"), 120, "the long subject running on a worker")
            family = psutil.Process(supervisor.pid).children(recursive=True)
            supervisor.send_signal(signal.SIGINT)
            try:
                assert supervisor.wait(STOPPED) == 0, workers["log"].read_text()
            except subprocess.TimeoutExpired:
                where = _where(supervisor.pid)
                supervisor.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack into the log
                with contextlib.suppress(subprocess.TimeoutExpired):
                    supervisor.wait(REAPED)
                said = workers["log"].read_text()[-6000:]
                pytest.fail(f"boothflow worker did not stop in {STOPPED} s: {where}\n{said}")
            _, alive = psutil.wait_procs(family, timeout=REAPED)
            assert not alive, alive  # no worker, run or training process outlives the supervisor
            state = client.read_flow_run(running.id).state
    finally:
        stop(night)
    said = workers["log"].read_text()
    assert f"run long ({running.id}) was in flight on " in said and f"boothflow rerun {running.id}" in said, said
    assert state.is_crashed() and "was stopped while the run was in flight" in state.message, state
    assert "stopped 3 workers" in said


def _where(pid: int) -> str:
    """What a stuck process is doing, as the kernel sees it: its signal masks, state and wait channel."""
    proc = Path(f"/proc/{pid}")
    status = [line for line in (proc / "status").read_text().splitlines() if line.startswith(("State", "Sig"))]
    return f"{'; '.join(status)}; wchan {(proc / 'wchan').read_text()}"


def _running(client, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterState

    found = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        name=FlowRunFilterName(any_=[name]), state=FlowRunFilterState(type={"any_": ["RUNNING"]})))  # fmt: skip
    return found[0] if found else None


def test_a_night_whose_folder_is_still_empty_completes_with_an_empty_summary(
    prefect_server: str, tmp_path: Path
) -> None:
    from flows.subjects import subjects

    (tmp_path / "subjects").mkdir()
    with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        state = subjects(str(tmp_path / "subjects"), "demo", [], str(tmp_path / "artifacts"), return_state=True)
    assert state.is_completed() and state.result()["subjects"] == []
    assert "0 subjects: 0 completed, 0 failed" in Path(state.result()["summary"]).read_text()


def test_a_killed_night_and_its_subject_show_as_crashed_in_runs(boothflow, prefect_server: str, tmp_path: Path):
    _subject(tmp_path / "subjects", "kim", DEMO[:3])
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"kill_at": "preprocess-items:after-1"}))  # the night's process, mid-subject
    killed = boothflow("subjects", tmp_path / "subjects", "--config", "demo", "--artifacts", tmp_path / "a", *_sets(),
                       check=False, env={"BOOTHFLOW_FAULTS": str(faults)})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ids = [folder.name for folder in (tmp_path / "a" / "runs").iterdir()]
    with client_for(prefect_server) as client:
        runs = {client.read_flow(run.flow_id).name: run for run in (client.read_flow_run(UUID(i)) for i in ids)}
        assert sorted(runs) == ["dreambooth", "dreambooth-subjects"]
        assert {run.state.name for run in runs.values()} == {"Running"}  # nobody told the server

    listed = boothflow("runs").stdout.splitlines()
    for run_id in ids:
        [row] = [line for line in listed if run_id in line]
        assert "Crashed" in row and "is gone" in row, row
    with client_for(prefect_server) as client:
        assert {client.read_flow_run(UUID(run_id)).state.name for run_id in ids} == {"Crashed"}

    faults.unlink()
    night = str(runs["dreambooth-subjects"].id)
    boothflow("rerun", night, "--summary", tmp_path / "night.json")
    [kim] = json.loads((tmp_path / "night.json").read_text())["subjects"]
    assert kim["state"] == "Completed" and _trained(kim), kim
    with client_for(prefect_server) as client:
        assert client.read_flow_run(UUID(night)).state.name == "Completed"
