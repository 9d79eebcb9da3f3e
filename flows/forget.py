"""`boothflow forget`: remove from an artifact root everything a subject's photos made, and nothing another subject
still uses.

A run registers every stage key it uses (`runs/<id>/keys.json`) and its instance folder (`summary.json`). The entries
to forget are the keys the folder's runs used that no other run used, but class images (made from the base model and
the class prompt, never from photos); with them go the item entries only they hold (a stage entry hard-links its
items' files, so an item whose files no kept entry links is one only the forgotten entries used), the training's
checkpoints, the runs' own records, the subject's published model, and the hash memo's rows for the folder's files.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from flows.gc import CHECKPOINTS_SUFFIX, ITEMS_SUFFIX, Removal, bytes_freed, inodes, remove
from flows.records import Run, gc_lock, instance_dir, recorded, runs
from tasks.core.config import ConfigError
from tasks.core.hash_memo import MEMO_FILE
from tasks.core.store import Store
from tasks.stages import promotion

NOT_FROM_PHOTOS = frozenset({"class_images", "class_images-items"})


@dataclass(frozen=True)
class Forgetting:
    """What forgetting a folder removes: store entries, the runs that used them, and what removing frees."""

    runs: list[str]
    removals: list[Removal]
    bytes: int


def _run_name(root: Path, run_id: str) -> str | None:
    """The run's name: a subject's, whose published model goes too."""
    return recorded(root, run_id, "name")


def plan(root: Path, folder: Path) -> tuple[list[Run], list[Removal]]:
    """The runs that trained from `folder` and the entries only they used. Refuses (ConfigError) while one of those
    runs is running, or when no run under `root` trained from `folder`."""
    folder = folder.resolve()
    every = runs(root)
    mine = [run for run in every if instance_dir(root, run.run_id) == folder]
    if not mine:
        raise ConfigError(f"no run under {root} trained from {folder}: nothing to forget (is --artifacts right?)")
    if running := [run.run_id for run in mine if run.running]:
        raise ConfigError(f"a run of {folder} is running ({', '.join(running)}): forget it once the run has ended")
    kept = frozenset().union(*(run.keys for run in every if run not in mine))
    doomed = {key for run in mine for key in run.keys if key not in kept and key.split("/")[0] not in NOT_FROM_PHOTOS}
    store, removals, kept_inodes, items = Store(root), [], set(), []
    for entry in store.entries():
        name = f"{entry['stage']}/{entry['key'].removesuffix(CHECKPOINTS_SUFFIX)}"
        if entry["stage"].endswith(ITEMS_SUFFIX):
            items.append(entry)
        elif name in doomed:
            removals.append(Removal(entry["stage"], entry["key"], entry["bytes"], f"made from {folder.name}"))
        else:
            kept_inodes |= inodes(store.path(entry["stage"], entry["key"]))
    doomed_inodes = set().union(*(inodes(store.path(r.stage, r.folder)) for r in removals))
    for entry in items:
        files = inodes(store.path(entry["stage"], entry["key"]))
        if files & doomed_inodes and not files & kept_inodes and entry["stage"] not in NOT_FROM_PHOTOS:
            removals.append(Removal(entry["stage"], entry["key"], entry["bytes"], f"an item of {folder.name}"))
    return mine, removals


def forget(root: Path, folder: Path, dry_run: bool) -> Forgetting:
    """Plan and (unless `dry_run`) remove, under the gc lock, so no `cache gc` runs meanwhile."""
    root = Path(root)
    with gc_lock(root):
        mine, removals = plan(root, folder)
        ids = [run.run_id for run in mine]
        if dry_run:
            return Forgetting(ids, removals, bytes_freed([Store(root).path(r.stage, r.folder) for r in removals]))
        freed = remove(root, removals)
        for name in {_run_name(root, run_id) for run_id in ids} - {None}:
            promotion.forget(root, name)
        for run_id in ids:
            shutil.rmtree(root / "runs" / run_id, ignore_errors=True)
        _forget_hashes(root, folder)
    return Forgetting(ids, removals, freed)


def _forget_hashes(root: Path, folder: Path) -> None:
    """The hash memo's rows for files under `folder` (as an absolute path, or resolved): their paths name the
    subject."""
    memo = root / MEMO_FILE
    if not memo.is_file():
        return
    db = sqlite3.connect(memo)
    try:
        with db:
            for prefix in {os.fsencode(folder.absolute()) + b"/", os.fsencode(folder.resolve()) + b"/"}:
                db.execute("DELETE FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
    finally:
        db.close()
