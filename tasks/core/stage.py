"""What a stage is, returns and raises: its one declaration, a small result (key, path, counts) and an error
naming the item. Only these small objects pass between stages and through Prefect; tensors and images stay on disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tasks.core.manifest import MANIFEST
from tasks.core.store import Entry, Store

Cfg = TypeVar("Cfg")
Inputs = TypeVar("Inputs")


class StageError(Exception):
    """A stage failure the user can act on: which stage, which item (file or step), and why."""

    def __init__(self, stage: str, message: str, item: str | None = None) -> None:
        super().__init__(f"{stage}: {item}: {message}" if item else f"{stage}: {message}")
        self.stage = stage
        self.item = item
        self.message = message


class UpstreamPending(Exception):
    """A key that hashes what an upstream stage produced, asked before that output exists (a plan, not a run)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"known once {stage} has run")
        self.stage = stage


def produced(result: StageResult, folder: str) -> dict[str, str]:
    """The sha256 of each file under `folder` of an upstream entry, by name, from its manifest (the runner checked
    the entry when it looked it up): what a downstream key hashes, so a rename upstream changes nothing below it."""
    try:
        files = json.loads((Path(result.path) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise UpstreamPending(result.stage) from err
    return {name: meta["sha256"] for name, meta in files.items() if name.startswith(f"{folder}/")}


@dataclass(frozen=True)
class StageResult:
    """A stage's committed output. Counts describe this call: work done now vs. served from caches."""

    stage: str
    key: str
    path: Path
    items_processed: int = 0
    items_cached: int = 0
    items_rejected: int = 0
    status: str = "ran"
    models_loaded: tuple[str, ...] = ()

    @classmethod
    def cached(cls, entry: Entry) -> StageResult:
        """A stage entry found complete in the store: every item it counts was served from the cache."""
        counts = {"items_cached": entry.info.get("items", 0), "items_rejected": entry.info.get("rejected", 0)}
        return cls(entry.stage, entry.key, entry.path, status="cached", **counts)


@dataclass(frozen=True)
class Stage(Generic[Cfg, Inputs]):
    """A stage, declared once: its name, the config section it reads, its key function, the function that builds
    its entry on a miss, and the folders inside the entry the run summary publishes. `run` is the plain function
    tests call; the flow makes the Prefect task, its cache policy and the summary from the same declaration."""

    name: str
    section: str
    key: Callable[[Cfg, Inputs], str]
    build: Callable[[Cfg, Inputs, Store, str], StageResult]
    outputs: Mapping[str, str] = field(default_factory=dict)

    def run(self, cfg: Cfg, inputs: Inputs, store: Store) -> StageResult:
        """The committed entry for this config and these inputs: found in the store, or built."""
        key = self.key(cfg, inputs)
        found = store.get(self.name, key)
        return StageResult.cached(found) if found is not None else self.build(cfg, inputs, store, key)

    def config(self, config: Any) -> Any:
        """This stage's section of a RunConfig."""
        return getattr(config, self.section)
