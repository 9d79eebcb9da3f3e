"""`boothflow cache gc`: old entries and damaged ones removed, never what a running run uses.

A run holds `.locks/runs/<run id>.lock` for its life and writes each stage key to `runs/<run id>/keys.json` before
it looks the key up. gc holds `.locks/gc.lock` while it decides and deletes, and a run takes the same lock to
register a key, so every entry is either registered before gc looks (and kept) or gone before the run looks it up
(and rebuilt by it). While any run is running, gc leaves item entries alone: builds read them without registering.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import Timeout

from flows.records import Run, gc_lock, instance_dir, runs
from tasks.core.manifest import MANIFEST
from tasks.core.store import DAMAGED, Store
from tasks.stages import promotion

ITEMS_SUFFIX = "-items"
TEXT_EMBEDS = "text-embeds-items"  # the train stage's item entries: each prompt's text-encoder output
CHECKPOINTS_SUFFIX = ".checkpoints"
DAY = 86400.0


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


@dataclass(frozen=True)
class Rules:
    """What `cache gc` removes. A stage entry goes when every rule given says so; none given: no stage entry goes."""

    keep_last: int | None = None  # keep what the last N runs used
    older_than_days: float | None = None  # keep what was used (or made) within this many days
    keep_nights: int | None = None  # keep, for each subject, what its last N runs used, and every published model
    damaged: bool = False  # remove entries set aside as damaged

    def any_age_rule(self) -> bool:
        return any(rule is not None for rule in (self.keep_last, self.older_than_days, self.keep_nights))


@dataclass(frozen=True)
class Kept:
    """What the rules about use keep: the stage keys (`stage/key`) of recent runs, and bare keys of published models."""

    recent: frozenset[str]
    subjects: frozenset[str]
    published: frozenset[str]


def _subjects_kept(root: Path, all_runs: list[Run], nights: int) -> frozenset[str]:
    """The keys each subject's last `nights` runs used. A run's subject is the instance folder it trained from (a run
    that recorded none is a subject of its own, so this rule never removes what it used)."""
    seen: Counter[str] = Counter()
    kept: set[str] = set()
    for run in all_runs:  # newest first
        subject = str(instance_dir(root, run.run_id) or run.run_id)
        if seen[subject] < nights or subject == run.run_id:
            kept |= run.keys
        seen[subject] += 1
    return frozenset(kept)


def _why_stale(name: str, age_days: float, rules: Rules, kept: Kept) -> str | None:
    """Why an entry goes, when every rule given says so; None when one of them keeps it."""
    reasons = []
    if rules.keep_last is not None:
        reasons.append(None if name in kept.recent else f"not used by the last {rules.keep_last} runs")
    if rules.older_than_days is not None:
        reasons.append(f"last used {age_days:.1f} days ago" if age_days > rules.older_than_days else None)
    if rules.keep_nights is not None:
        mine = name in kept.subjects or name.partition("/")[2] in kept.published
        reasons.append(None if mine else f"not used by its subject's last {rules.keep_nights} runs nor published")
    return None if None in reasons else "; ".join(reasons)


def plan(root: Path, stages: list[str], rules: Rules) -> tuple[list[Removal], list[str]]:
    """What gc removes under `root` (hold the gc lock), and notes on what it left alone and why.

    A stage entry goes when every rule given says so (`Rules`). An item entry goes when no entry kept shares a file
    with it (stage entries hard-link their items' files; text embeddings are read in place by the training that needs
    them, and rebuilt by one that finds them gone). `damaged`: every entry set aside as damaged. Never: an entry a
    running run registered, a partial entry being written, anything outside the pipeline's stages.
    """
    store, all_runs, now = Store(root), runs(root), time.time()
    running = [r for r in all_runs if r.running]
    protected = frozenset().union(*(r.keys for r in running))
    kept = Kept(
        frozenset().union(*(r.keys for r in all_runs[: rules.keep_last or 0])),
        _subjects_kept(root, all_runs, rules.keep_nights) if rules.keep_nights is not None else frozenset(),
        frozenset(key for record in promotion.every_record(root) for key in (record.get("keys") or {}).values() if key),
    )
    last_use: dict[str, float] = {}
    for run in all_runs:
        for key in run.keys:
            last_use[key] = max(last_use.get(key, 0.0), run.last_active)
    removals, notes, kept_inodes = [], [], set()
    items: list[dict[str, Any]] = []
    for entry in store.entries():
        folder = store.path(entry["stage"], entry["key"])
        if entry["state"] == "damaged":
            if rules.damaged:
                removals.append(Removal(entry["stage"], entry["key"], entry["bytes"], "damaged, set aside"))
            continue
        if entry["state"] == "partial":
            continue
        if _item_stage_of(entry["stage"]) in stages:
            items.append(entry)
            continue
        if entry["stage"] not in stages or not rules.any_age_rule():
            continue
        name = f"{entry['stage']}/{entry['key'].removesuffix(CHECKPOINTS_SUFFIX)}"
        age_days = (now - max(last_use.get(name, 0.0), _created(folder))) / DAY
        why = None if name in protected else _why_stale(name, age_days, rules, kept)
        if why is None:
            kept_inodes |= inodes(folder)
        else:
            removals.append(Removal(entry["stage"], entry["key"], entry["bytes"], why))
    if items and running:
        notes.append(f"item entries kept: {len(running)} run(s) running")
    elif rules.any_age_rule():
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


def collect(root: Path, stages: list[str], rules: Rules, dry_run: bool) -> tuple[list[Removal], list[str], int]:
    """`boothflow cache gc`: plan and (unless `dry_run`) remove, all under the gc lock; with the bytes freed (or that
    removing would free)."""
    with gc_lock(Path(root)):
        removals, notes = plan(Path(root), stages, rules)
        if dry_run:
            return removals, notes, bytes_freed([Store(root).path(r.stage, r.folder) for r in removals])
        return removals, notes, remove(Path(root), removals)
