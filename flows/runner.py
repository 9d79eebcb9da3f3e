"""Runs stage tasks for one flow run and keeps its summary: status, key, time and item counts per stage.

The summary is written to `<root>/runs/<flow run id>/summary.json` on success and on failure, so the CLI,
`boothflow runs` and the report read one record of what happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows.fleet import fleet_build
from flows.records import RunKeys, summary_path
from tasks.core.config import ConfigError, RunConfig
from tasks.core.faults import ENV, fault
from tasks.core.remote import open_store
from tasks.core.stage import Stage, StageError, StageResult, UpstreamPending
from tasks.core.store import DiskFull, Entry, RemoteError, Store
from tasks.core.values import folder_or_url
from tasks.sd.device import loads, release

EXPECTED = (StageError, DiskFull, RemoteError)  # failures the user acts on, each said in one line
MODEL_STAGES = frozenset({"class_images", "latents", "train", "generate", "evaluate"})  # what holds a GPU slot
WORKER_ENV = "PREFECT__WORKER_NAME"  # set by a Prefect worker in the flow runs it starts


class ExpectedFailures(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback; for an expected failure the line (which holds
    the error's one-line message) is all there is to say, so its traceback is dropped before any handler sees it.
    Any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED):
            record.exc_info, record.exc_text = None, None
        return True


for _engine_logger in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_engine_logger).addFilter(ExpectedFailures())


class PeakMemory:
    """Samples the resident memory of this process and its children (the training child included) while a stage
    runs, and keeps the peak in MiB."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._done = interval, 0, threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while True:
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return round(self.peak / 2**20, 1)


class StopAfterStage(Exception):
    """Raised after the one stage `boothflow stage NAME` asked for."""


def fail_if_injected(stage: str) -> None:
    """Fail `stage` with a clear error when the fault `fail_stage` names it (tests of reruns and retries)."""
    if fault("fail_stage") == stage:
        raise StageError(stage, f"injected fault (fail_stage={stage!r} in {ENV})", item="fault")


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: Stage, cfg: Any, inputs: Any, store: Store, key: str, found: Entry | None) -> StageResult | State:
    """Every stage runs as this task, named after it. The store is the only cache: `found` is the entry the runner
    looked up for `key`, served as Prefect's `Cached` state (Prefect keeps no cache records of its own)."""
    if found is not None:
        return Completed(name="Cached", message=f"{stage.name}/{key} from the store", data=StageResult.cached(found))
    fail_if_injected(stage.name)
    return stage.build(cfg, inputs, store, key)


@contextlib.contextmanager
def accelerator_slot(limit: str, stage: str) -> Iterator[None]:
    """A slot of the Prefect global concurrency limit `limit` while a stage that loads a model runs (none for the
    others, or without a limit): workers that share GPUs never put two such stages on one."""
    if not limit or stage not in MODEL_STAGES:
        yield
        return
    try:
        with concurrency(limit, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
            yield
    except ConcurrencySlotAcquisitionError:  # raised only while acquiring: the limit does not exist
        raise StageError(stage, _no_limit(limit)) from None


def check_concurrency_limit(limit: str) -> None:
    """Raise ConfigError when the server lacks `limit`, so a run finds out before its first stage, not at the first
    stage that loads a model."""
    if not limit:
        return
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            raise ConfigError(_no_limit(limit)) from None


def _no_limit(limit: str) -> str:
    return (f"the Prefect server has no global concurrency limit {limit!r} (run.concurrency_limit); create it: "
            f"prefect global-concurrency-limit create {limit} --limit 1")  # fmt: skip


def parent_record(root: Path, flow_run_id: str, kind: str) -> Path:
    """What a parent run (`sweep`, `night`) did, run by run, beside where its summary would be: the CLI's table and
    --summary."""
    path = summary_path(root, flow_run_id).with_name(f"{kind}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class StageRunner:
    """Runs the pipeline's stages in order; with `only`, upstream stages come from the cache alone; with
    `plan`, nothing runs and each stage just gets its key and whether the store already holds it."""

    def __init__(self, config: RunConfig, stage_names: list[str], only: str | None = None, plan: bool = False) -> None:
        if only is not None and only not in stage_names:
            raise StageError(only, f"no such stage; stages are: {', '.join(stage_names)}")
        self.config = config
        self.root = config.run.artifacts_root
        self.store = open_store(config.run)
        self.only = only
        self.plan = plan
        self.waits_for: str | None = None  # in a plan: the stage whose output the next keys need
        self.current: str | None = None
        self.summary: dict[str, Any] = {
            "run": {
                "name": config.run.name,
                "flow_run_id": str(flow_run.id),
                "stage": only,
                "worker": os.environ.get(WORKER_ENV),
                "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "instance_dir": str(folder_or_url(config.data.instance_dir)),  # what `forget` finds its runs by
            },
            "stages": {name: {"status": "skipped"} for name in stage_names},
            "outputs": {},
            "models_loaded": [],
            "waiting": [],  # instance files modified too recently: left for the next run
            "error": None,
        }

    def __enter__(self) -> StageRunner:
        self.keys = RunKeys(self.root, self.summary["run"]["flow_run_id"])
        if not self.plan:
            self.keys.__enter__()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if not self.plan:
            self.keys.__exit__()
        if isinstance(error, StopAfterStage):
            error = None
        if error is not None:
            stage = getattr(error, "stage", None) or self.current or "flow"
            self.summary["error"] = {
                "stage": stage,
                "item": getattr(error, "item", None),
                "message": getattr(error, "message", None) or f"{type(error).__name__}: {error}",
                "expected": isinstance(error, EXPECTED),  # a setting, a photo or the disk: trying again changes nothing
            }
            if stage in self.summary["stages"]:
                self.summary["stages"][stage] = {"status": "failed"}
        if not self.plan:
            self.write()
        return kind is StopAfterStage

    @staticmethod
    @contextlib.contextmanager
    def building(store: Store, stage: str, key: str, found: Entry | None) -> Iterator[Entry | None]:
        """Hold the entry's build lock through a whole build, on this machine and across the fleet, so a second run
        of the same key waits and is then served what the first one built (a second look under the lock, which
        downloads it from the shared store); a found entry needs no lock."""
        if found is not None:
            yield found
            return
        with store.building(stage, key), fleet_build(store, stage, key):
            yield store.get(stage, key)

    def pending(self, stage: Stage, label: str) -> StageResult:
        """In a plan, a stage whose key hashes an upstream output the store does not hold yet: its key is unknown
        until that stage has run, and so is every later stage's."""
        self.summary["stages"][label] = {"status": f"after {self.waits_for}", "key": None}
        self.current = None
        return StageResult(stage.name, "", Path(self.root) / stage.name / "pending", status="pending")

    def write(self) -> Path:
        """The summary under the artifact root, and in the shared store for a parent run on another machine."""
        run_id, text = self.summary["run"]["flow_run_id"], json.dumps(self.summary, indent=1, default=str)
        path = summary_path(self.root, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if self.store.remote is not None:
            try:
                self.store.remote.put_summary(run_id, text.encode())
            except RemoteError as err:
                logging.getLogger("prefect.boothflow").warning("the run's summary is only here: %s", err.message)
        return path

    def run(self, stage: Stage, inputs: Any, label: str | None = None, cfg: Any = None) -> StageResult:
        """Run one stage as its Prefect task (a cache hit shows as `Cached` in Prefect) and record its outcome,
        with the folders of its entry that it publishes listed as absolute paths. The store entry is looked up
        (and its files checked) once, here. A stage run twice in one pipeline (generate and evaluate over the
        validation renders) is `label`led there, with its own `cfg`; its entries stay the stage's."""
        name, store = stage.name, self.store
        label, cfg = label or name, cfg if cfg is not None else stage.config(self.config)
        self.current = label
        if self.plan and self.waits_for:
            return self.pending(stage, label)
        started, peak_memory = time.monotonic(), None
        try:
            key = stage.key(cfg, inputs)
        except UpstreamPending as pending:  # a real run has its upstream outputs; only a plan can get here
            if not self.plan:
                raise
            self.waits_for = pending.stage
            return self.pending(stage, label)
        if not self.plan:
            self.keys.use(name, key)  # before the lookup, so `cache gc` keeps what this run is about to use
        found = store.get(name, key, fetch=not self.plan)
        if self.plan:
            held = found is not None or store.in_remote(name, key)
            result = StageResult(name, key, store.path(name, key), status="cached" if held else "to run")
        elif self.only is not None and label != self.only:
            if found is None:
                raise StageError(
                    self.only,
                    f"upstream stage {label!r} has no cached output for this config; "
                    f"run `boothflow run` (or `boothflow stage {label}`) first",
                )
            result = StageResult(name, key, found.path, status="cached")
        else:
            loads_before = loads()
            with self.building(store, name, key, found) as found:
                limit = self.config.run.concurrency_limit if found is None else ""  # the store serves it: no GPU
                with accelerator_slot(limit, name), PeakMemory() as memory:
                    task = stage_task.with_options(name=label)
                    state = task(stage, cfg, inputs, store, key, found, return_state=True)
            if loads() != loads_before:  # its models are gone: give their memory back before the next stage
                release()  # (a full collection costs ~0.3 s, a cached stage loads nothing and skips it)
            if state.is_failed():
                raise state.result(raise_on_failure=False)
            result, peak_memory = state.result(), memory.mib
            self.summary["models_loaded"] += [f"{label}: {model}" for model in result.models_loaded]
        self.summary["stages"][label] = {
            "status": result.status,
            "key": result.key,
            "seconds": round(time.monotonic() - started, 3),
            "items_processed": result.items_processed,
            "items_cached": result.items_cached,
            "items_rejected": result.items_rejected,
            "peak_memory_mb": peak_memory,
        }
        for output, relative in stage.outputs.items():
            self.summary["outputs"][output] = str((result.path / relative).resolve())
        self.current = None
        if self.only == label:
            raise StopAfterStage
        return result
