"""Prefect cache policy and lock manager backed by the stage store.

Prefect trusts its own record, so a record is dropped whenever the store entry it stands for is missing or
damaged; the lock manager uses flock, so a killed holder never blocks the next run.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

POLL_SECONDS = 0.2


@dataclass
class StoreKey(CachePolicy):
    """Cache key `<stage>/<store key>`, from the `key` argument of the stage task.

    The runner looks the store entry up before the task starts and drops Prefect's record when the entry is
    missing or damaged (`forget_record`), so the policy itself never touches the store.
    """

    stage: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any):
        return f"{self.stage}/{inputs['key']}"


def prefect_records(root: Path) -> Path:
    """The folder Prefect owns inside the store for its cache records (never the store root)."""
    return Path(root) / ".prefect"


class FlockLockManager:
    """Prefect LockManager on `fcntl.flock`: one file per key, released by the OS when the holder dies."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._held: dict[str, tuple[str, int]] = {}

    def _file(self, key: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / (key.replace("/", "__") + ".lock")

    def _try(self, key: str) -> int | None:
        fd = os.open(self._file(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout=None) -> bool:
        held = self._held.get(key)
        if held and held[0] == holder:
            return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while (fd := self._try(key)) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout=None, hold_timeout=None) -> bool:
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        held = self._held.get(key)
        if not held or held[0] != holder:
            raise ValueError(f"lock {key!r} is not held by {holder!r}")
        del self._held[key]
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        fd = self._try(key)
        if fd is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        held = self._held.get(key)
        return bool(held and held[0] == holder)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)


def forget_record(root: Path, stage: str, key: str) -> None:
    """Drop Prefect's record of a stage entry the store does not hold (any more), so the task runs again."""
    (prefect_records(root) / stage / key).unlink(missing_ok=True)


def cache_options(stage: str, root: Path) -> dict[str, Any]:
    """`with_options` arguments that make a stage task cache across runs through the store."""
    policy = StoreKey(stage=stage).configure(
        isolation_level="SERIALIZABLE", lock_manager=FlockLockManager(Path(root) / ".locks" / "prefect")
    )
    return {"cache_policy": policy, "result_storage": prefect_records(root), "persist_result": True}
