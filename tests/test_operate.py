"""Operating boothflow against the suite's Prefect server: rerun a failed run, nightly serve, deploy, concurrency."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from uuid import UUID

from PIL import Image
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.states import AwaitingRetry
from prefect_api import client_for, run_deployment_now, task_states, wait_for, webhook
from processes import run, start, stop

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = ["--set", "train.steps=3", "--set", "train.checkpoint_every=0", "--set", "generate.steps=2",
         "--set", "generate.seeds=[0]"]  # fmt: skip
UPSTREAM = ("preprocess", "latents", "train")


def _artifacts(api: str, flow_run_id: str) -> list:
    with client_for(api) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]))
        )


def _base(tmp_path: Path) -> list:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    return ["--config", "configs/demo.toml", "--artifacts", tmp_path / "a", "--set", f"data.instance_dir='{images}'",
            *QUICK]  # fmt: skip


def test_failed_generate_is_rerun_under_the_same_id_with_finished_stages_cached(
    boothflow, prefect_server: str, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"fail_stage": "generate"}))
    env = {"BOOTHFLOW_FAULTS": str(faults)}
    failed = boothflow("run", *_base(tmp_path), "--summary", tmp_path / "1.json", check=False, env=env)
    assert failed.returncode == 1
    summary = json.loads((tmp_path / "1.json").read_text())
    run_id = summary["run"]["flow_run_id"]
    assert (summary["error"]["stage"], summary["error"]["item"]) == ("generate", "fault")
    assert summary["stages"]["report"]["status"] == "skipped"
    first = {a.key: a for a in _artifacts(prefect_server, run_id)}
    assert "generate" in first["run-summary"].data and "injected fault" in first["run-summary"].data
    assert "report-link" not in first
    runs = boothflow("runs").stdout
    assert run_id in runs and "generate" in runs

    faults.unlink()
    boothflow("rerun", run_id, "--summary", tmp_path / "2.json", env=env)
    second = json.loads((tmp_path / "2.json").read_text())
    assert second["run"]["flow_run_id"] == run_id and second["error"] is None
    states = task_states(prefect_server, run_id)
    assert {s: states[s] for s in UPSTREAM} == dict.fromkeys(UPSTREAM, "Cached")
    assert (states["generate"], states["report"]) == ("Completed", "Completed")
    with client_for(prefect_server) as client:
        assert client.read_flow_run(UUID(run_id)).run_count == 2
    keys = {a.key for a in _artifacts(prefect_server, run_id)}
    assert {"run-summary", "stage-summary", "report-samples", "report-link"} <= keys


def _state(api: str, run_id: str) -> str:
    with client_for(api) as client:
        return client.read_flow_run(UUID(run_id)).state.name


def test_nightly_serve_schedules_in_local_time_caches_quiet_nights_and_retries_like_the_ui(
    cli_env: dict, prefect_server: str, tmp_path: Path
) -> None:
    base = _base(tmp_path)
    images = Path(base[5].split("=", 1)[1].strip("'"))
    faults = tmp_path / "faults.json"
    env = {**cli_env, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "BOOTHFLOW_FAULTS": str(faults)}
    with webhook() as (notify, received):
        command = [BIN / "boothflow", "serve", "--cron", "0 3 * * *", "--timezone", "Europe/Berlin", "--notify", notify,
                   *map(str, base)]  # fmt: skip
        serve = start(command, log=tmp_path / "serve.log", cwd=REPO, env=env)
        try:
            with client_for(prefect_server) as client:
                deployment = wait_for(lambda: _deployment(client), 90, "the served deployment")
                schedule = deployment.schedules[0].schedule
                assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "Europe/Berlin")

            first = run_deployment_now(prefect_server, "dreambooth/nightly")
            quiet = run_deployment_now(prefect_server, "dreambooth/nightly")
            assert _state(prefect_server, first) == _state(prefect_server, quiet) == "Completed"
            assert set(task_states(prefect_server, quiet).values()) == {"Cached"}

            Image.open(images / "toy_01_park.jpg").rotate(180).save(images / "new.png")
            grown = run_deployment_now(prefect_server, "dreambooth/nightly")
            table = {a.key: a for a in _artifacts(prefect_server, grown)}["stage-summary"].data
            rows = {row["stage"]: row for row in json.loads(table)}
            assert (rows["preprocess"]["items_processed"], rows["latents"]["items_processed"]) == (1, 1)
            assert rows["train"]["status"] == "ran"

            faults.write_text(json.dumps({"fail_stage": "generate"}))
            Image.open(images / "toy_02_shelf.png").rotate(180).save(images / "another.png")  # so generate runs
            failed = run_deployment_now(prefect_server, "dreambooth/nightly")
            assert _state(prefect_server, failed) == "Failed"
            [posted] = wait_for(lambda: received, 120, "the failed night's webhook")
            with client_for(prefect_server) as client:
                name = client.read_flow_run(UUID(failed)).name
            assert posted["subject"] == f"boothflow run {name} Failed", posted
            assert f"boothflow run {name} of dreambooth/nightly ended Failed: " in posted["text"], posted
            assert "generate: fault: injected fault" in posted["text"], posted  # the failed stage and its cause
            faults.unlink()
            with client_for(prefect_server) as client:
                client.set_flow_run_state(UUID(failed), AwaitingRetry(message="Retry from the UI"), force=True)
            wait_for(
                lambda: _state(prefect_server, failed) in ("Completed", "Failed", "Crashed"), 240, "the retried run"
            )
            assert _state(prefect_server, failed) == "Completed"
            states = task_states(prefect_server, failed)
            assert {s: states[s] for s in UPSTREAM} == dict.fromkeys(UPSTREAM, "Cached")
        finally:
            stop(serve)


def _deployment(client):
    try:
        return client.read_deployment_by_name("dreambooth/nightly")
    except Exception:
        return None


def test_prefect_yaml_deploys_to_a_process_work_pool(cli_env: dict) -> None:
    env = {k: v for k, v in cli_env.items()}
    prefect = str(BIN / "prefect")
    run([prefect, "work-pool", "create", "boothflow-process", "--type", "process"], cwd=REPO, env=env,
        capture_output=True)  # fmt: skip
    deployed = run([prefect, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with client_for(env["PREFECT_API_URL"]) as client:
        deployment = client.read_deployment_by_name("dreambooth/nightly-worker")
    assert deployment.entrypoint == "flows/dreambooth.py:dreambooth"
    assert deployment.work_pool_name == "boothflow-process"
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    with client_for(env["PREFECT_API_URL"]) as client:
        night = client.read_deployment_by_name("dreambooth-subjects/nightly-subjects-worker")
    assert night.entrypoint == "flows/subjects.py:subjects" and night.work_queue_name == "nights"
    assert night.parameters["pool"] == "boothflow-gpu" and night.schedules[0].schedule.cron == "0 2 * * *"

    notified = run([BIN / "boothflow", "notify", "https://hooks.example.com/x", "--deployment", "nightly-worker"],
                   cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert notified.returncode == 0, notified.stderr
    with client_for(env["PREFECT_API_URL"]) as client:
        [automation] = client.read_automations_by_name("boothflow: a night of nightly-worker failed")
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert automation.trigger.match_related.model_dump() == {"prefect.resource.role": "deployment",
                                                "prefect.resource.name": "nightly-worker"}  # fmt: skip
    assert [action.type for action in automation.actions] == ["send-notification"]


def test_two_concurrent_runs_compute_each_key_once(cli_env: dict, tmp_path: Path) -> None:
    base = [str(a) for a in _base(tmp_path)]
    procs = []
    try:
        for i in range(2):
            procs.append(start([BIN / "boothflow", "run", *base, "--summary", tmp_path / f"{i}.json"],
                               log=tmp_path / f"{i}.log", cwd=REPO, env=cli_env))  # fmt: skip
        for i, proc in enumerate(procs):
            assert proc.wait(600) == 0, (tmp_path / f"{i}.log").read_text()[-3000:]
    finally:
        stop(*procs)
    a, b = (json.loads((tmp_path / f"{i}.json").read_text())["stages"] for i in range(2))
    for name in a:
        total = a[name]["items_processed"] + a[name]["items_cached"]
        assert total == b[name]["items_processed"] + b[name]["items_cached"] > 0, name
        assert a[name]["items_processed"] + b[name]["items_processed"] == total, name  # each item computed once
        assert sorted([a[name]["status"], b[name]["status"]]) == ["cached", "ran"], name  # one built, one waited


def test_a_killed_run_shows_as_crashed_and_boothflow_rerun_finishes_it(boothflow, prefect_server, tmp_path: Path):
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"kill_at": "train:mid-checkpoint-2"}))  # the flow process and its training child
    base = [*_base(tmp_path), "--set", "train.checkpoint_every=2"]
    killed = boothflow("run", *base, check=False, env={"BOOTHFLOW_FAULTS": str(faults)})
    assert killed.returncode == -9
    [run_id] = [folder.name for folder in (tmp_path / "a" / "runs").iterdir()]
    with client_for(prefect_server) as client:
        assert client.read_flow_run(UUID(run_id)).state.name == "Running"  # nobody told the server

    [row] = [line for line in boothflow("runs").stdout.splitlines() if run_id in line]
    assert "Crashed" in row and "is gone" in row, row
    with client_for(prefect_server) as client:
        assert client.read_flow_run(UUID(run_id)).state.name == "Crashed"

    faults.unlink()
    boothflow("rerun", run_id, "--summary", tmp_path / "2.json")
    assert json.loads((tmp_path / "2.json").read_text())["error"] is None
    with client_for(prefect_server) as client:
        assert client.read_flow_run(UUID(run_id)).state.name == "Completed"
