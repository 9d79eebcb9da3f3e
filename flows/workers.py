"""`boothflow worker`: one Prefect process worker per GPU (or per group of GPUs) of this machine, Prefect's own
`prefect worker start`, each running one flow run at a time on its own GPUs, supervised until Ctrl-C or SIGTERM.

A run of N training processes needs a worker that sees N GPUs: it is submitted to the pool's work queue for N
(`default` for one, `processes-N` otherwise), and each worker polls only the queue of its GPU count.

A pool's or deployment's job variables may set any environment variable of the runs a worker starts, so the GPU is
not taken from the run's own environment: each worker is started with `BOOTHFLOW_WORKER_GPU`, and a run reads it
from the worker process's environment (fixed when the worker started) and sets `CUDA_VISIBLE_DEVICES` from it
before anything touches CUDA.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Crashed
from prefect.workers.process import ProcessWorker

from tasks.core.config import RunConfig

GPU_ENV = "BOOTHFLOW_WORKER_GPU"  # set on each worker process; its runs take their GPU from it
ARTIFACTS_ENV = "BOOTHFLOW_WORKER_ARTIFACTS"  # set by `boothflow worker --artifacts`: its runs' artifact root
FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"  # set by a worker on the process of each run it starts
STOP_GRACE = 20.0  # seconds workers and their runs have to stop after Ctrl-C before their process groups are killed


@dataclass
class Worker:
    name: str
    gpu: str | None  # its CUDA_VISIBLE_DEVICES, e.g. "0" or "2,3"; None without GPUs
    queues: list[str]
    process: subprocess.Popen


def queue_for(processes: int) -> str:
    """The work queue of runs with this many training processes: only a worker that sees that many GPUs polls it."""
    return "default" if processes == 1 else f"processes-{processes}"


def queues_polled(gpus: list[str]) -> list[str]:
    """A worker with k GPUs takes runs of k processes; one without GPUs, runs of up to as many processes as it has
    CPU cores (the training check's limit there)."""
    if gpus:
        return [queue_for(len(gpus))]
    return [queue_for(n) for n in range(1, len(os.sched_getaffinity(0)) + 1)]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them; none without CUDA."""
    if not torch.cuda.is_available():
        return []
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    if shown:
        return [device.strip() for device in shown.split(",") if device.strip()][: torch.cuda.device_count()]
    return [str(index) for index in range(torch.cuda.device_count())]


def ensure_queues(pool: str, queues: list[str]) -> None:
    """Create the pool (a process pool, as `prefect worker start` would) and the work queues its workers poll, when
    missing: a worker that polls a queue that does not exist takes no run from any of its queues."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            with contextlib.suppress(ObjectAlreadyExists):  # another machine's `boothflow worker` made it meanwhile
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        for queue in queues:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_queue(name=queue, work_pool_name=pool)


def start_workers(pool: str, groups: list[list[str]], artifacts: Path | None = None) -> list[Worker]:
    """One `prefect worker start` per group of GPUs (one without GPUs), each the leader of its own process group and
    named `<host>-gpu<ids>` (`<host>-cpu`), once the pool and their queues exist; with `artifacts`, the artifact
    root of every run they take."""
    ensure_queues(pool, sorted({queue for gpus in groups or [[]] for queue in queues_polled(gpus)}))
    host = socket.gethostname().split(".")[0]
    workers = []
    for gpus in groups or [[]]:
        gpu = ",".join(gpus) or None
        name = f"{host}-gpu{'+'.join(gpus)}" if gpus else f"{host}-cpu"
        env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": gpu, GPU_ENV: gpu} if gpu else {})
        env |= {ARTIFACTS_ENV: str(artifacts)} if artifacts is not None else {}
        queues = queues_polled(gpus)
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                   "--name", name, "--limit", "1"]  # fmt: skip
        command += [arg for queue in queues for arg in ("--work-queue", queue)]
        workers.append(Worker(name, gpu, queues, subprocess.Popen(command, env=env, start_new_session=True)))
    return workers


def runs_in_flight(workers: list[Worker]) -> dict[str, str]:
    """Flow run id -> worker name for each run a worker's processes are running now."""
    found = {}
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(worker.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if run_id := child.environ().get(FLOW_RUN_ENV):
                        found[run_id] = worker.name
    return found


def stop_workers(workers: list[Worker], grace: float = STOP_GRACE) -> list[str]:
    """Stop the workers and the runs they started: SIGINT (a Prefect worker's way out), `grace` seconds, then
    SIGKILL to every process group they made. Runs that were in flight and are still shown as running become
    Crashed; returns one line per such run."""
    in_flight = runs_in_flight(workers)
    family = [psutil.Process(w.process.pid) for w in workers if w.process.poll() is None]
    family += [child for proc in list(family) for child in _children(proc)]
    for proc in family:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if proc.pid == os.getpgid(proc.pid):  # a group leader (a worker, a run): the whole group
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(family, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    for worker in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(10)
    return [_crashed(run_id, name) for run_id, name in in_flight.items()]


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _crashed(run_id: str, worker: str) -> str:
    """Mark a run the stop cut short as Crashed (unless it ended on its own) and say so, with how to resume it."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        if flow_run.state is not None and not flow_run.state.is_final():
            reason = f"worker {worker} was stopped while the run was in flight"
            client.set_flow_run_state(flow_run.id, Crashed(message=reason), force=True)
            return f"run {flow_run.name} ({run_id}) was in flight on {worker}: Crashed; `boothflow rerun {run_id}` " \
                   "resumes it from its last finished stage"  # fmt: skip
        state = flow_run.state.name if flow_run.state else "unknown"
        return f"run {flow_run.name} ({run_id}) on {worker} ended {state} before the stop"


def pin_worker_gpu() -> str | None:
    """In a run a `boothflow worker` started: set CUDA_VISIBLE_DEVICES to that worker's GPU, whatever the run's job
    variables said, and return it (None elsewhere). The worker is the outermost ancestor that carries GPU_ENV."""
    gpu = None
    with contextlib.suppress(psutil.Error):
        for ancestor in psutil.Process().parents():
            with contextlib.suppress(psutil.Error):
                gpu = ancestor.environ().get(GPU_ENV, gpu)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def on_this_machine(config: RunConfig) -> RunConfig:
    """In a run a `boothflow worker --artifacts ROOT` started: the config with that worker's artifact root, since the
    submitter's path means nothing here (with a shared store, the worker's root is this machine's cache of it)."""
    root = os.environ.get(ARTIFACTS_ENV)
    if not root:
        return config
    return config.model_copy(update={"run": config.run.model_copy(update={"artifacts_root": Path(root)})})
