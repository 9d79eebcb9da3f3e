"""Two machines and one shared store: two artifact roots on this box, each the cache of one S3 endpoint (moto's
server, started by the test), through the `boothflow` CLI against the suite's Prefect server."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import s3fs
from object_store import BUCKET, S3_CREDENTIALS
from prefect_api import client_for, task_states, wait_for
from processes import start, started, stop
from store_views import checkpoints, training

from flows.fleet import LEASE_SECONDS
from flows.server import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = ["--set", "train.steps=3", "--set", "train.checkpoint_every=0", "--set", "generate.steps=2",
         "--set", "generate.seeds=[0]"]  # fmt: skip


def _shared(endpoint: str, tmp_path: Path) -> tuple[list[str], str]:
    """`--set`s that make a run use a fresh prefix of the bucket as its shared store; and that store's URL."""
    url = f"s3://{BUCKET}/{tmp_path.name}-{uuid.uuid4().hex[:8]}"
    return ["--set", f"run.store='{url}'", "--set", f"run.store_options={{endpoint_url='{endpoint}'}}"], url


def _demo(tmp_path: Path, endpoint: str) -> tuple[list[str], str]:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    store, url = _shared(endpoint, tmp_path)
    return ["--config", "configs/demo.toml", "--set", f"data.instance_dir='{images}'", *QUICK, *store], url


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _manifests(endpoint: str, url: str) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    base = url.removeprefix("s3://")
    return {path.removeprefix(f"{base}/entries/"): fs.cat_file(path) for path in fs.glob(f"{base}/entries/*/*.json")}


def _local_manifest(root: Path, stage_and_key: str) -> bytes:
    return (root / stage_and_key.removesuffix(".json") / "manifest.json").read_bytes()


def test_a_run_on_machine_a_is_served_whole_on_machine_b(boothflow, prefect_server, s3_endpoint, tmp_path: Path):
    """A reads its photos from a folder, B the same photos from the bucket: the keys are the same."""
    base, url = _demo(tmp_path, s3_endpoint)
    a, b = tmp_path / "a", tmp_path / "b"
    photos = f"{url}-photos/rex"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).put(
        str(tmp_path / "images"), photos.removeprefix("s3://"), recursive=True
    )
    boothflow("run", *base, "--artifacts", a, "--summary", tmp_path / "a.json", env=S3_CREDENTIALS)
    from_bucket = ["--set", f"data.instance_dir='{photos}'"]
    boothflow("run", *base, *from_bucket, "--artifacts", b, "--summary", tmp_path / "b.json", env=S3_CREDENTIALS)
    built, served = _summary(tmp_path / "a.json"), _summary(tmp_path / "b.json")
    assert served["run"]["instance_dir"] == photos
    assert {s["status"] for s in built["stages"].values() if s["status"] != "skipped"} == {"ran"}
    ran = [name for name, s in built["stages"].items() if s["status"] == "ran"]
    assert {name: served["stages"][name]["status"] for name in ran} == dict.fromkeys(ran, "cached")
    assert {name: served["stages"][name]["key"] for name in ran} == {name: built["stages"][name]["key"] for name in ran}
    assert served["models_loaded"] == [] and served["error"] is None
    assert task_states(prefect_server, served["run"]["flow_run_id"]) == dict.fromkeys(ran, "Cached")

    remote = _manifests(s3_endpoint, url)
    assert {name.split("/")[0] for name in remote} >= set(ran)
    for stage in ran:  # each machine's copy is the shared store's entry
        entry = f"{stage}/{built['stages'][stage]['key']}.json"
        assert _local_manifest(a, entry) == remote[entry] == _local_manifest(b, entry), stage
    report = Path(served["outputs"]["report_html"])
    assert report.is_relative_to(b)
    _serves_report(tmp_path / "c", report.relative_to(b), report.read_bytes(), base)  # C has run nothing

    listed = boothflow("cache", "ls", "--remote", *base, "--artifacts", b, env=S3_CREDENTIALS).stdout
    assert all(built["stages"][stage]["key"] in listed for stage in ran), listed
    checked = boothflow("cache", "verify", "--remote", *base, "--artifacts", b, env=S3_CREDENTIALS).stdout
    assert f"checked {len(remote)} entries at {url}: all intact" in checked


def _workers_online(client, pool: str) -> int:
    try:
        return len(client.read_workers_for_work_pool(pool))
    except Exception:  # the pool is not there yet
        return 0


def _serves_report(root: Path, report: Path, page: bytes, settings: list[str]) -> None:
    """`boothflow ui` on `root`, with the run's settings, serves the report page `report` over http, byte for byte."""
    port = free_port()
    log, record = root.parent / "ui.log", root / ".boothflow-ui.json"
    store = [arg for arg in settings if arg.startswith("run.store")]
    command = [BIN / "boothflow", "ui", "--port", port, "--artifacts", root, *(x for s in store for x in ("--set", s))]
    env = {**S3_CREDENTIALS, "PATH": str(BIN), "HOME": str(root.parent), "PREFECT_HOME": str(root.parent / "ui-home")}
    with started(command, grace=60, log=log, cwd=REPO, env=env) as ui:
        deadline = time.monotonic() + 120
        while not record.is_file():
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        url = f"{json.loads(record.read_text())['artifacts_url']}/{report}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == page
    assert (root / report).read_bytes() == page  # the entry is now this root's too


def _machine_env(env: dict, machine: str, tmp_path: Path, faults: Path, database: Path | None = None) -> dict:
    """A machine's environment: its own faults file; with `database`, no shared server but a temporary one of its own,
    in its own Prefect home (a copy of a migrated database)."""
    env = {**env, **S3_CREDENTIALS, "BOOTHFLOW_FAULTS": str(faults)}
    if database is not None:
        home = tmp_path / f"{machine}-prefect-home"
        home.mkdir()
        shutil.copy(database, home / "prefect.db")
        env["PREFECT_HOME"] = str(home)
        env.pop("PREFECT_API_URL")
    return env


def _preprocess(machine: str, base: list, env: dict, tmp_path: Path):
    command = [BIN / "boothflow", "stage", "preprocess", *base, "--artifacts", tmp_path / machine,
               "--summary", tmp_path / f"{machine}.json"]  # fmt: skip
    return start(command, log=tmp_path / f"{machine}.log", cwd=REPO, env=env)


def _held(faults: Path) -> bool:
    return bool(list(faults.parent.glob(f"{faults.name}.held-*")))


def test_without_a_shared_server_both_machines_build_one_entry_at_once_and_keep_the_winners(
    boothflow, cli_env: dict, migrated_database: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    """Each machine on a temporary Prefect server of its own (no lock across machines): both hold after uploading
    their blobs, until both are there; then both write the manifest: one wins."""
    base, url = _demo(tmp_path, s3_endpoint)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"hold_at": "preprocess:before-publish"}))
    procs = []
    try:
        for machine in ("a", "b"):
            env = _machine_env(cli_env, machine, tmp_path, faults, migrated_database)
            procs.append(_preprocess(machine, base, env, tmp_path))
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("faults.json.held-*"))) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "both never held"
            time.sleep(0.2)
        faults.write_text("{}")
        for machine, proc in zip("ab", procs, strict=True):
            assert proc.wait(240) == 0, (tmp_path / f"{machine}.log").read_text()[-3000:]
    finally:
        stop(*procs)
    summaries = [_summary(tmp_path / f"{machine}.json")["stages"]["preprocess"] for machine in "ab"]
    assert [s["status"] for s in summaries] == ["ran", "ran"] and summaries[0]["key"] == summaries[1]["key"]
    entry = f"preprocess/{summaries[0]['key']}.json"
    remote = _manifests(s3_endpoint, url)
    assert _local_manifest(tmp_path / "a", entry) == remote[entry] == _local_manifest(tmp_path / "b", entry)
    for machine in "ab":
        assert "all intact" in boothflow("cache", "verify", "--artifacts", tmp_path / machine).stdout
    checked = boothflow("cache", "verify", "--remote", *base, "--artifacts", tmp_path / "a", env=S3_CREDENTIALS)
    assert "all intact" in checked.stdout


def _b_waits_on_a(base: list, cli_env: dict, tmp_path: Path, procs: list) -> Path:
    """Machine A builds the entry and holds before committing it, holding its build lease; machine B, started then,
    finds the entry in neither store and is still waiting for the lease 20 s later. Returns A's faults file: emptied,
    A goes on."""
    held, free = tmp_path / "a-faults.json", tmp_path / "b-faults.json"
    held.write_text(json.dumps({"hold_at": "preprocess:before-publish"}))
    free.write_text("{}")
    procs.append(_preprocess("a", base, _machine_env(cli_env, "a", tmp_path, held), tmp_path))
    wait_for(lambda: _held(held) or procs[0].poll() is not None, 240, "machine a holding its build")
    assert procs[0].poll() is None, (tmp_path / "a.log").read_text()[-3000:]
    procs.append(_preprocess("b", base, _machine_env(cli_env, "b", tmp_path, free), tmp_path))
    time.sleep(20)
    assert procs[1].poll() is None and not (tmp_path / "b.json").exists(), (tmp_path / "b.log").read_text()
    return held


def test_with_a_shared_server_the_second_machine_waits_and_is_served_the_first_ones_entry(
    cli_env: dict, s3_endpoint: str, tmp_path: Path
) -> None:
    """B waits for A's build and is served A's entry from the store: one build across both."""
    base, url = _demo(tmp_path, s3_endpoint)
    procs: list = []
    try:
        _b_waits_on_a(base, cli_env, tmp_path, procs).write_text("{}")
        for machine, proc in zip("ab", procs, strict=True):
            assert proc.wait(240) == 0, (tmp_path / f"{machine}.log").read_text()[-3000:]
    finally:
        stop(*procs)
    a, b = (_summary(tmp_path / f"{machine}.json")["stages"]["preprocess"] for machine in "ab")
    assert (a["status"], b["status"], a["key"]) == ("ran", "cached", b["key"])
    entry = f"preprocess/{a['key']}.json"
    assert _local_manifest(tmp_path / "a", entry) == _manifests(s3_endpoint, url)[entry]
    assert _local_manifest(tmp_path / "b", entry) == _local_manifest(tmp_path / "a", entry)
    assert not (tmp_path / "b" / "preprocess-items").exists()  # b processed no image


def test_a_machine_that_dies_holding_a_build_loses_it_after_its_lease(cli_env: dict, s3_endpoint: str, tmp_path):
    """A is SIGKILLed while it holds the build; B takes the build over once the lease has run out and builds the
    entry itself."""
    base, url = _demo(tmp_path, s3_endpoint)
    procs: list = []
    try:
        _b_waits_on_a(base, cli_env, tmp_path, procs)
        killed_at = time.monotonic()
        stop(procs[0], first=signal.SIGKILL)  # the machine is gone: no release, no renewal
        assert procs[1].wait(240) == 0, (tmp_path / "b.log").read_text()[-3000:]
        waited = time.monotonic() - killed_at
    finally:
        stop(*procs)
    assert not (tmp_path / "a.json").exists()
    b = _summary(tmp_path / "b.json")["stages"]["preprocess"]
    assert b["status"] == "ran" and waited < LEASE_SECONDS + 60, waited  # the lease, the repossessor's loop, a retry
    assert f"preprocess/{b['key']}.json" in _manifests(s3_endpoint, url)


RESUMABLE = ["--set", "train.steps=8", "--set", "train.checkpoint_every=2", "--set", "train.sample_every=4"]


def test_a_training_killed_on_machine_a_resumes_on_machine_b_bit_for_bit(
    boothflow, s3_endpoint: str, tmp_path: Path
) -> None:
    """A is killed once its step-4 checkpoint is in the shared store (step 4's sample weights went first). B reruns
    the run: it waits out A's lease on the training, downloads that checkpoint, resumes from it, and its entry equals
    an uninterrupted training's on a machine without a shared store."""
    base, url = _demo(tmp_path, s3_endpoint)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"kill_at": "train:uploaded-step-000004"}))
    killed = boothflow("run", *base, *RESUMABLE, "--artifacts", tmp_path / "a", check=False,
                       env={**S3_CREDENTIALS, "BOOTHFLOW_FAULTS": str(faults)})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    [key] = {name.split("/")[0] for name in checkpoints(s3_endpoint, url)}
    assert checkpoints(s3_endpoint, url) == [f"{key}/samples/step-000004.json", f"{key}/step-000004.json"]

    boothflow("run", *base, *RESUMABLE, "--artifacts", tmp_path / "b", "--summary", tmp_path / "b.json",
              env=S3_CREDENTIALS)  # fmt: skip
    train = _summary(tmp_path / "b.json")["stages"]["train"]
    assert (train["status"], train["key"], train["items_cached"], train["items_processed"]) == ("ran", key, 4, 4)
    assert checkpoints(s3_endpoint, url) == []  # the entry is committed: its resume state is gone

    boothflow("run", *base[:-4], *RESUMABLE, "--artifacts", tmp_path / "alone")  # no shared store: same keys
    assert training(tmp_path / "b", key) == training(tmp_path / "alone", key)


def test_a_kill_between_blobs_and_manifest_or_mid_download_leaves_nothing_trusted(
    boothflow, s3_endpoint, tmp_path: Path
) -> None:
    base, url = _demo(tmp_path, s3_endpoint)
    faults = tmp_path / "faults.json"
    env = {**S3_CREDENTIALS, "BOOTHFLOW_FAULTS": str(faults)}
    a, b = ["--artifacts", tmp_path / "a"], ["--artifacts", tmp_path / "b"]

    faults.write_text(json.dumps({"kill_at": "preprocess:before-publish"}))
    assert boothflow("stage", "preprocess", *base, *a, check=False, env=env).returncode == -9
    assert not any(name.startswith("preprocess/") for name in _manifests(s3_endpoint, url))  # blobs, no manifest
    assert "all intact" in boothflow("cache", "verify", "--remote", *base, *a, env=env).stdout
    faults.unlink()
    boothflow("stage", "preprocess", *base, *a, "--summary", tmp_path / "a.json", env=env)
    key = _summary(tmp_path / "a.json")["stages"]["preprocess"]["key"]
    assert any(name == f"preprocess/{key}.json" for name in _manifests(s3_endpoint, url))

    faults.write_text(json.dumps({"kill_at": "preprocess:mid-download-2"}))
    assert boothflow("stage", "preprocess", *base, *b, check=False, env=env).returncode == -9
    assert not (tmp_path / "b" / "preprocess" / key).exists()
    assert list((tmp_path / "b" / "preprocess").glob(f"{key}.partial-*"))  # what the download left: not an entry
    faults.unlink()
    boothflow("stage", "preprocess", *base, *b, "--summary", tmp_path / "b.json", env=env)
    served = _summary(tmp_path / "b.json")["stages"]["preprocess"]
    assert (served["status"], served["key"], served["items_processed"]) == ("cached", key, 0)
    assert not list((tmp_path / "b" / "preprocess").glob(f"{key}.partial-*"))
    assert "all intact" in boothflow("cache", "verify", *b).stdout
    assert "all intact" in boothflow("cache", "verify", "--remote", *base, *b, env=env).stdout


def test_a_sweep_reads_the_cells_a_worker_ran_in_its_own_root_from_the_shared_store(
    boothflow, cli_env: dict, prefect_server: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """The submitter's artifact root and the worker's are two machines': the cells' summaries, reports and losses
    reach the comparison through the shared store."""
    base, _ = _demo(tmp_path, s3_endpoint)
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('name = "shared"\nconfig = "demo"\n[matrix]\n"train.seed" = [1]\n')
    submitter, machine = tmp_path / "submitter", tmp_path / "worker"
    env = {**cli_env, **S3_CREDENTIALS, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    command = [BIN / "boothflow", "worker", "--pool", "shared-store-pool", "--artifacts", machine]
    with (
        started(command, first=signal.SIGINT, log=tmp_path / "worker.log", cwd=REPO, env=env),
        client_for(prefect_server) as client,
    ):
        wait_for(lambda: _workers_online(client, "shared-store-pool"), 180, "the worker online")
        sets = [arg for arg in base if arg != "--config" and arg != "configs/demo.toml"]
        boothflow("sweep", sweep, "--pool", "shared-store-pool", "--artifacts", submitter, "--summary",
                  tmp_path / "sweep.json", *sets, env=S3_CREDENTIALS)  # fmt: skip
    result = _summary(tmp_path / "sweep.json")
    assert [cell["state"] for cell in result["cells"]] == ["Completed"]
    for cell in result["cells"]:
        assert (machine / "runs" / cell["flow_run_id"] / "summary.json").is_file()
        assert not (submitter / "runs" / cell["flow_run_id"]).exists()  # it ran on the worker's machine
        for name in ("report_html", "loss_csv"):
            output = Path(cell["summary"]["outputs"][name])
            assert output.is_relative_to(submitter) and output.is_file(), name  # fetched from the shared store
    page = Path(result["comparison"]).read_text()
    assert "Completed" in page and "train.seed" in page


def test_a_subjects_night_reads_its_subjects_from_a_bucket(boothflow, s3_endpoint: str, tmp_path: Path) -> None:
    store, url = _shared(s3_endpoint, tmp_path)
    subjects = f"{url}-subjects"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).put(
        str(REPO / "data" / "demo"), f"{subjects.removeprefix('s3://')}/rex", recursive=True
    )
    night = ["--artifacts", tmp_path / "night", "--summary", tmp_path / "night.json", *QUICK, *store]
    boothflow("subjects", subjects, "--config", "demo", *night, "--set", "data.settle_minutes=0", env=S3_CREDENTIALS)
    [row] = _summary(tmp_path / "night.json")["subjects"]
    assert (row["subject"], row["state"]) == ("rex", "Completed")
    assert list((tmp_path / "night" / ".photos").glob("*/toy_01_park.jpg"))  # the photos, mirrored from the bucket
