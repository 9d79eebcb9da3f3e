"""A sweep as one parent flow run: each cell is a `dreambooth` flow run under it, run here one after another or
submitted as a deployment run that the workers of a work pool pick up; then one comparison of every cell.

Cells share the artifact root, so what they have in common (a dataset's preprocessing and latents, the class images
of a base model) is built once; on a pool, stages that load a model hold a slot of one Prefect concurrency limit.
"""

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, NamedTuple
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import (
    aupdate_progress_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import WorkQueueStatus
from prefect.deployments import run_deployment
from prefect.deployments.flow_runs import arun_deployment
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.flow_runs import wait_for_flow_run
from prefect.runtime import flow_run
from prefect.states import State

from flows.dreambooth import check_plan, dreambooth
from flows.liveness import mark_crashed
from flows.preflight import check_settings
from flows.publish import report_link
from flows.records import RunKeys, outputs_here, read_summary
from flows.runner import parent_record
from flows.server import HEARTBEAT_SECONDS
from flows.workers import queue_for
from tasks.core.config import ConfigError, RunConfig
from tasks.core.remote import open_store
from tasks.core.stage import StageError
from tasks.core.store import Store
from tasks.core.sweeps import Cell, Sweep
from tasks.stages import comparison

GPU_LIMIT = "boothflow-gpu"  # the Prefect global concurrency limit: its slots are the pool's GPUs
SWEEPS_FOLDER = "sweeps"  # <artifacts root>/sweeps/<sweep name>/comparison.html


def deployment_name(pool: str) -> str:
    return f"sweep-{pool}"


def deploy_cells(pool: str) -> str:
    """The deployment a pool's workers run cells from: the `dreambooth` flow by module path (every worker has
    boothflow installed), no schedule. Returns `flow/deployment` for run_deployment."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise StageError("pool", f"work pool {pool!r} not found; start its workers, one per GPU, on each GPU "
                             f"machine: boothflow worker --pool {pool}") from None  # fmt: skip
    deployment = RunnerDeployment.from_flow(
        dreambooth,
        name=deployment_name(pool),
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["boothflow", "sweep"],
        description="Cells of boothflow sweeps; `boothflow sweep FILE --pool POOL` submits runs of it.",
    )
    deployment.apply()
    return f"{dreambooth.name}/{deployment_name(pool)}"


def gpu_limit(slots: int | None = None, at_least: int = 1) -> int:
    """Make sure the limit exists; with `slots`, set it; else raise it to `at_least` (never lower it). Returns its
    slots. Machines of a fleet may call it at the same moment: the one that did not create the limit updates it."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            created = slots or at_least
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=created))
                return created
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        wanted = slots if slots is not None else max(limit.limit, at_least)
        if wanted != limit.limit:
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=wanted))
        return wanted


def _on_pool(config: RunConfig) -> RunConfig:
    """A cell's config on a pool holds the GPU limit's slots, unless it names its own limit."""
    if config.run.concurrency_limit:
        return config
    return config.model_copy(update={"run": config.run.model_copy(update={"concurrency_limit": GPU_LIMIT})})


class CellProgress:
    """A log line and the parent run's progress artifact in the UI, updated as each cell finishes."""

    def __init__(self, total: int, what: str = "cells", key: str = "sweep-progress") -> None:
        self.total, self.done, self.what = total, 0, what
        self.artifact = create_progress_artifact(0.0, key=key, description=f"0 of {total} {what}")

    async def finished(self, name: str, state: str) -> None:
        self.done += 1
        get_run_logger().info(f"{self.done} of {self.total} {self.what} finished: {name}: {state}")
        await aupdate_progress_artifact(
            self.artifact, 100 * self.done / self.total, f"{self.done} of {self.total} {self.what}"
        )


def submit(cells: list[Cell], pool: str, slots: int | None, tag: str) -> list[UUID]:
    """Submit every cell as a run of the pool's deployment (each a flow run under this one); their run ids. Each
    cell checks its devices on the worker that runs it."""
    name = deploy_cells(pool)
    slots = gpu_limit(slots)
    get_run_logger().info(f"{len(cells)} cells on work pool {pool!r}; stages that load a model hold a slot of "
                          f"concurrency limit {GPU_LIMIT!r} ({slots}); change it with "
                          f"prefect global-concurrency-limit update {GPU_LIMIT} --limit N")  # fmt: skip
    queues = {cell.name: queue_for(cell.config.train.num_processes) for cell in cells}
    _warn_unpolled(pool, set(queues.values()))
    submitted = [
        run_deployment(name, parameters={"config": _on_pool(cell.config).model_dump(mode="json")},
                       flow_run_name=cell.name, timeout=0, tags=["boothflow", tag], work_queue_name=queues[cell.name])
        for cell in cells
    ]  # fmt: skip
    return [cell_run.id for cell_run in submitted]


def _warn_unpolled(pool: str, queues: set[str]) -> None:
    """Say which runs will wait: those whose work queue no worker of the pool polls now."""
    with get_client(sync_client=True) as client:
        ready = {q.name for q in client.read_work_queues(work_pool_name=pool) if q.status == WorkQueueStatus.READY}
    for queue in sorted(queues - ready):
        gpus = "" if queue == "default" else f" --gpus {'+'.join(map(str, range(int(queue.split('-')[1]))))}"
        get_run_logger().warning(f"no worker polls work queue {queue!r} of pool {pool!r} now: its runs wait until one "
                                 f"starts (boothflow worker --pool {pool}{gpus})")  # fmt: skip


class Ran(NamedTuple):
    """A cell's run as it ended: its flow run id, its final state and how many times it was tried."""

    flow_run_id: str
    state: str
    tries: int = 1


def summary_of(store: Store, flow_run_id: str) -> dict[str, Any] | None:
    """A cell's summary, wherever it ran, with its outputs in this artifact root (fetched from a shared store)."""
    return outputs_here(read_summary(store.root, flow_run_id, store.remote), store)


def worth_retrying(state: State, summary: dict[str, Any] | None) -> bool:
    """A run whose process or machine went away, or that failed on an error no setting, photo or disk explains; a
    run that failed before it wrote a summary (its parameters) would fail again."""
    if state.is_crashed():
        return True
    return state.is_failed() and ((summary or {}).get("error") or {}).get("expected") is False


def wait_all(ids: list[UUID], progress: CellProgress, store: Store, retries: int = 0) -> list[Ran]:
    """Every submitted run once it has finished, in the order given. A run worth retrying is submitted again, as a
    new run of the same deployment with the same parameters, up to `retries` times. (Not the same run sent back: the
    worker that ran it still holds it, and marks it Crashed once more, after its process is gone.)"""
    return asyncio.run(_wait(ids, progress, store, retries)) if ids else []


async def _wait(ids: list[UUID], progress: CellProgress, store: Store, retries: int) -> list[Ran]:
    finished, cell_of, tries = {}, {flow_run_id: flow_run_id for flow_run_id in ids}, dict.fromkeys(ids, 1)
    waiting = {asyncio.ensure_future(wait_for_flow_run(flow_run_id, timeout=None)) for flow_run_id in ids}
    watching = asyncio.ensure_future(_mark_dead(cell_of))
    try:
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for cell_run in (task.result() for task in done):
                cell = cell_of.pop(cell_run.id)
                if tries[cell] <= retries and worth_retrying(cell_run.state, summary_of(store, str(cell_run.id))):
                    tries[cell] += 1
                    ended = f"{cell_run.name} ended {cell_run.state.name}: {cell_run.state.message}"
                    get_run_logger().warning(f"{ended}; try {tries[cell]} of {retries + 1}")
                    again = await arun_deployment(cell_run.deployment_id, parameters=cell_run.parameters, timeout=0,
                                                  flow_run_name=cell_run.name, tags=cell_run.tags,
                                                  work_queue_name=cell_run.work_queue_name)  # fmt: skip
                    cell_of[again.id] = cell
                    waiting.add(asyncio.ensure_future(wait_for_flow_run(again.id, timeout=None)))
                    continue
                finished[cell] = Ran(str(cell_run.id), cell_run.state.name, tries[cell])
                await progress.finished(cell_run.name, cell_run.state.name)
    finally:
        watching.cancel()
    return [finished[flow_run_id] for flow_run_id in ids]


async def _mark_dead(in_flight: dict[UUID, UUID]) -> None:
    """A run whose machine died never ends by itself: mark each in-flight run Crashed once its heartbeats stop, so
    the wait ends (and the run is tried again when worth it)."""
    while True:
        await asyncio.sleep(HEARTBEAT_SECONDS)
        await asyncio.to_thread(_mark_crashed, list(in_flight))


def _mark_crashed(flow_run_ids: list[UUID]) -> None:
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            mark_crashed(client, client.read_flow_run(flow_run_id))


def run_here(cells: list[Cell], progress: CellProgress, store: Store, retries: int = 0) -> list[Ran]:
    """Each cell as a subflow run of this one, in turn (a failed cell stops no other); one that failed on an
    unexpected error runs again, as a new subflow run, up to `retries` times."""
    ran = []
    for cell in cells:
        for tried in range(1, retries + 2):
            state = dreambooth.with_options(flow_run_name=cell.name)(cell.config, return_state=True)
            flow_run_id = str(state.state_details.flow_run_id)
            if tried > retries or not worth_retrying(state, summary_of(store, flow_run_id)):
                break
        ran.append(Ran(flow_run_id, state.name, tried))
        asyncio.run(progress.finished(cell.name, state.name))
    return ran


@flow(name="dreambooth-sweep")
def sweep(spec: Sweep, pool: str = "", slots: int | None = None) -> dict[str, Any]:
    """A matrix of DreamBooth runs and their comparison; with `pool`, cells run on that work pool's workers (and
    check their devices there)."""
    for cell in spec.cells:
        try:
            check_settings(cell.config) if pool else check_plan(cell.config)
        except (StageError, ConfigError) as err:
            raise StageError("config", f"cell {cell.name!r}: {getattr(err, 'message', err)}") from None
    store = open_store(spec.base.run)
    with RunKeys(store.root, str(flow_run.id)):  # its lock: `runs` marks the sweep Crashed once its process is gone
        return _sweep(spec, store, pool, slots)


def _sweep(spec: Sweep, store: Store, pool: str, slots: int | None) -> dict[str, Any]:
    root = store.root
    if pool:
        ran = wait_all(submit(spec.cells, pool, slots, f"sweep:{spec.name}"), CellProgress(len(spec.cells)), store)
    else:
        ran = run_here(spec.cells, CellProgress(len(spec.cells)), store)
    cells = [
        comparison.CellRun(
            cell.name, cell.config.model_dump(mode="json"), run.state, summary_of(store, run.flow_run_id)
        )
        for cell, run in zip(spec.cells, ran, strict=True)
    ]
    target = root / SWEEPS_FOLDER / spec.name
    facts = comparison.write(spec.name, spec.base.model_dump(mode="json"), cells, target, spec.reference)
    publish(facts, root)
    record = {
        "sweep": spec.name,
        "comparison": str(facts["html"]),
        "cells": [{"cell": cell.name, "flow_run_id": run.flow_run_id, "state": cell.state, "summary": cell.summary}
                  for cell, run in zip(cells, ran, strict=True)],
    }  # fmt: skip
    parent_record(root, str(flow_run.id), "sweep").write_text(json.dumps(record, indent=1, default=str))
    failed = [row["cell"] for row in facts["cells"] if row["failed"]]
    if failed:
        raise StageError("sweep", f"{len(failed)} of {len(cells)} cells failed: {', '.join(failed)}; "
                         f"the comparison shows why: {facts['html']}")  # fmt: skip
    return record


def publish(facts: dict[str, Any], root: Path) -> None:
    """The comparison in the Prefect UI: a table of cells and a link to the page."""
    rows = [{"cell": row["cell"], "status": row["status"], "worker": row["worker"], **row["settings"],
             "training_seconds": row["training_seconds"], "final_loss": row["final_loss"], **row["metrics"]}
            for row in facts["cells"]]  # fmt: skip
    link = report_link(Path(facts["html"]), root)
    lines = [f"# boothflow sweep `{facts['name']}`", "", f"{len(rows)} cells; comparison: [{facts['html']}]({link})"]
    if facts["reference"]:
        lines += ["", "| | DINO | CLIP-I | CLIP-T |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['name']} | {r['dino']} | {r['clip_i']} | {r['clip_t']} |" for r in facts["reference"]]
    create_markdown_artifact("\n".join(lines), key="sweep-summary", description="boothflow sweep")
    create_table_artifact(rows, key="sweep-cells", description="One row per cell of the sweep")
    create_link_artifact(link, link_text=f"comparison: {facts['html']}", key="sweep-comparison",
                         description="Sweep comparison page")  # fmt: skip
