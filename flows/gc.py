"""What runs use, and `boothflow cache gc`: old entries and damaged ones removed, never what a running run uses.

A run holds `.locks/runs/<run id>.lock` for its life and writes each stage key to `runs/<run id>/keys.json` before
it looks the key up. gc holds `.locks/gc.lock` while it decides and deletes, and a run takes the same lock to
register a key, so every entry is either registered before gc looks (and kept) or gone before the run looks it up
(and rebuilt by it). While any run is running, gc leaves item entries alone: builds read them without registering.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tasks.core.store import DAMAGED, MANIFEST, Store

KEYS_FILE = "keys.json"
PROCESS_FILE = "process.json"
ITEMS_SUFFIX = "-items"
TEXT_EMBEDS = "text-embeds-items"  # the train stage's item entries: each prompt's text-encoder output
CHECKPOINTS_SUFFIX = ".checkpoints"
DAY = 86400.0


def gc_lock(root: Path) -> FileLock:
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    return FileLock(root / ".locks" / "gc.lock")


def _run_lock(root: Path, run_id: str) -> FileLock:
    folder = root / ".locks" / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / f"{run_id}.lock")


class RunKeys:
    """The keys one run uses, registered before each lookup; the run's lock says it is still running, and
    `runs/<id>/process.json` which process on which host holds it."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.root, self.run_id, self.keys = Path(root), run_id, []
        self.lock = _run_lock(self.root, run_id)

    def __enter__(self) -> RunKeys:
        self.lock.acquire()
        folder = self.root / "runs" / self.run_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROCESS_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def use(self, stage: str, key: str) -> None:
        folder = self.root / "runs" / self.run_id
        folder.mkdir(parents=True, exist_ok=True)
        with gc_lock(self.root):
            self.keys.append(f"{stage}/{key}")
            temp = folder / f"{KEYS_FILE}.{uuid.uuid4().hex[:8]}.tmp"
            temp.write_text(json.dumps(self.keys))
            temp.replace(folder / KEYS_FILE)


@dataclass(frozen=True)
class Run:
    run_id: str
    last_active: float  # when it last registered a key
    keys: frozenset[str]
    running: bool


def _running(root: Path, run_id: str) -> bool:
    lock = _run_lock(root, run_id)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def process_gone(root: Path, run_id: str) -> str | None:
    """How a run's process is known to be gone: it ran on this host and no process holds its lock any more (the
    kernel drops the lock of a killed process). None when it is alive, ran elsewhere, or never got that far."""
    try:
        process = json.loads((Path(root) / "runs" / run_id / PROCESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if process.get("host") != socket.gethostname() or _running(Path(root), run_id):
        return None
    return f"its boothflow process (pid {process.get('pid')} on {process.get('host')}) is gone"


def runs(root: Path) -> list[Run]:
    """Every run that registered keys here, newest first."""
    found = []
    for keys_file in (Path(root) / "runs").glob(f"*/{KEYS_FILE}"):
        run_id = keys_file.parent.name
        keys = frozenset(json.loads(keys_file.read_text()))
        found.append(Run(run_id, keys_file.stat().st_mtime, keys, _running(root, run_id)))
    return sorted(found, key=lambda r: r.last_active, reverse=True)


@dataclass(frozen=True)
class Removal:
    stage: str
    folder: str
    bytes: int
    why: str


def _created(folder: Path) -> float:
    try:
        return json.loads((folder / MANIFEST).read_text())["created_at"]
    except (OSError, ValueError, KeyError, TypeError):
        return folder.stat().st_mtime


def inodes(folder: Path) -> set[int]:
    return {f.stat().st_ino for f in folder.rglob("*") if f.is_file()}


def _item_stage_of(stage: str) -> str | None:
    """The pipeline stage whose builds write (and read) the item entries of store stage `stage`; None for others."""
    if not stage.endswith(ITEMS_SUFFIX):
        return None
    return "train" if stage == TEXT_EMBEDS else stage.removesuffix(ITEMS_SUFFIX)


def bytes_freed(folders: list[Path]) -> int:
    """What deleting `folders` gives back: a file hard-linked among them counts once, and one that a link outside
    them keeps counts not at all."""
    stats: dict[tuple[int, int], os.stat_result] = {}
    links: Counter[tuple[int, int]] = Counter()
    for folder in folders:
        for file in (f for f in folder.rglob("*") if f.is_file() and not f.is_symlink()):
            stat = file.stat()
            stats[stat.st_dev, stat.st_ino] = stat
            links[stat.st_dev, stat.st_ino] += 1
    return sum(stat.st_size for inode, stat in stats.items() if links[inode] >= stat.st_nlink)


def _stale(recent: bool, age_days: float, keep_last: int | None, older_than_days: float | None) -> str | None:
    """Why an entry goes, when every rule given says so; None when one of them keeps it."""
    reasons = []
    if keep_last is not None:
        reasons.append(None if recent else f"not used by the last {keep_last} runs")
    if older_than_days is not None:
        reasons.append(f"last used {age_days:.1f} days ago" if age_days > older_than_days else None)
    return None if None in reasons else "; ".join(reasons)


def plan(
    root: Path, stages: list[str], keep_last: int | None, older_than_days: float | None, damaged: bool
) -> tuple[list[Removal], list[str]]:
    """What gc removes under `root` (hold the gc lock), and notes on what it left alone and why.

    An entry of a pipeline stage goes when every rule given says so: not used by the last `keep_last` runs, and
    not used (or made) within `older_than_days`. An item entry goes when no entry kept shares a file with it (stage
    entries hard-link their items' files; text embeddings are read in place by the training that needs them, and
    rebuilt by one that finds them gone). `damaged`: every entry set aside as damaged. Never: an entry a running
    run registered, a partial entry being written, anything outside the pipeline's stages.
    """
    store, all_runs, now = Store(root), runs(root), time.time()
    running = [r for r in all_runs if r.running]
    protected = frozenset().union(*(r.keys for r in running))
    recent = frozenset().union(*(r.keys for r in all_runs[:keep_last])) if keep_last is not None else None
    last_use: dict[str, float] = {}
    for run in all_runs:
        for key in run.keys:
            last_use[key] = max(last_use.get(key, 0.0), run.last_active)
    removals, notes, kept_inodes = [], [], set()
    items: list[dict[str, Any]] = []
    for entry in store.entries():
        folder = store.path(entry["stage"], entry["key"])
        if entry["state"] == "damaged":
            if damaged:
                removals.append(Removal(entry["stage"], entry["key"], entry["bytes"], "damaged, set aside"))
            continue
        if entry["state"] == "partial":
            continue
        if _item_stage_of(entry["stage"]) in stages:
            items.append(entry)
            continue
        if entry["stage"] not in stages or (keep_last is None and older_than_days is None):
            continue
        name = f"{entry['stage']}/{entry['key'].removesuffix(CHECKPOINTS_SUFFIX)}"
        age_days = (now - max(last_use.get(name, 0.0), _created(folder))) / DAY
        why = None if name in protected else _stale(name in (recent or ()), age_days, keep_last, older_than_days)
        if why is None:
            kept_inodes |= inodes(folder)
        else:
            removals.append(Removal(entry["stage"], entry["key"], entry["bytes"], why))
    if items and running:
        notes.append(f"item entries kept: {len(running)} run(s) running")
    elif keep_last is not None or older_than_days is not None:
        for entry in items:
            folder = store.path(entry["stage"], entry["key"])
            if entry["state"] == "complete" and not inodes(folder) & kept_inodes:
                removals.append(Removal(entry["stage"], entry["key"], entry["bytes"], "no kept entry uses it"))
    return removals, notes


def remove(root: Path, removals: list[Removal]) -> int:
    """Delete what `plan` chose (hold the gc lock): each folder is first renamed away, so no lookup ever sees half
    of it, and its key's lock file goes with it (a waiter on the old file retries on a new one); an entry whose key
    lock is busy (being built) is skipped. Returns the bytes freed."""
    store, renamed = Store(root), []
    for removal in removals:
        folder = store.path(removal.stage, removal.folder)
        key = removal.folder.split(DAMAGED)[0].removesuffix(CHECKPOINTS_SUFFIX)
        lock = store.lock(removal.stage, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        doomed = folder.with_name(f".removing-{uuid.uuid4().hex[:8]}-{removal.folder}")
        try:
            folder.rename(doomed)
            Path(lock.lock_file).unlink()
        finally:
            lock.release()
        renamed.append(doomed)
    freed = bytes_freed(renamed)
    for doomed in renamed:
        shutil.rmtree(doomed, ignore_errors=True)
    return freed


def collect(
    root: Path, stages: list[str], keep_last: int | None, older_than_days: float | None, damaged: bool, dry_run: bool
) -> tuple[list[Removal], list[str], int]:
    """`boothflow cache gc`: plan and (unless `dry_run`) remove, all under the gc lock; with the bytes freed (or that
    removing would free)."""
    with gc_lock(Path(root)):
        removals, notes = plan(Path(root), stages, keep_last, older_than_days, damaged)
        if dry_run:
            return removals, notes, bytes_freed([Store(root).path(r.stage, r.folder) for r in removals])
        return removals, notes, remove(Path(root), removals)
