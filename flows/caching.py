"""Prefect cache policy and lock manager backed by the stage store.

Prefect trusts its own record, so the policy drops the record whenever the store entry it stands for is
missing or damaged; the lock manager uses flock, so a killed holder never blocks the next run.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.logging import get_logger

from tasks.core.store import Store

POLL_SECONDS = 0.2
logger = get_logger("boothflow.caching")


@dataclass
class StoreKey(CachePolicy):
    """Cache key `<stage>/<store key>`, valid only while the store holds a complete entry for it.

    `key_fn(cfg, inputs)` gets the stage task's arguments and returns the stage's store key. It must never
    raise (Prefect would silently stop caching), so a failure yields no key: the task then runs and
    reports the real error itself.
    """

    stage: str = ""
    root: Path = field(default_factory=Path)
    key_fn: Callable[..., str] | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any):
        try:
            key = self.key_fn(inputs["cfg"], inputs["inputs"])
            store = Store(self.root)
            if not store.is_complete(self.stage, key):
                (prefect_records(self.root) / self.stage / key).unlink(missing_ok=True)
            return f"{self.stage}/{key}"
        except Exception as err:  # never raise: see the docstring
            logger.warning("no cache key for %s (%s); the stage will run", self.stage, err)
            return None


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


def cache_options(stage: str, root: Path, key_fn: Callable[..., str]) -> dict[str, Any]:
    """`with_options` arguments that make a stage task cache across runs through the store."""
    policy = StoreKey(stage=stage, root=Path(root), key_fn=key_fn).configure(
        isolation_level="SERIALIZABLE", lock_manager=FlockLockManager(Path(root) / ".locks" / "prefect")
    )
    return {"cache_policy": policy, "result_storage": prefect_records(root), "persist_result": True}
