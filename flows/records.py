"""A run's records under `<root>/runs/<run id>/`: the stage keys it uses (`keys.json`), the process that runs it
(`process.json`) and what it did (`summary.json`); and `.locks/runs/<run id>.lock`, held for the run's life.

gc, forget, `boothflow runs` and the parent flows read them; the runner writes them.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tasks.core.remote import Remote
from tasks.core.store import Store

KEYS_FILE = "keys.json"
PROCESS_FILE = "process.json"


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


def summary_path(root: Path, flow_run_id: str) -> Path:
    return Path(root) / "runs" / flow_run_id / "summary.json"


def read_summary(root: Path, flow_run_id: str, remote: Remote | None = None) -> dict[str, Any] | None:
    """The summary a run wrote under `root` (or, run on another machine, to the shared store `remote`), if it got far
    enough to write one."""
    path = summary_path(root, flow_run_id)
    if path.is_file():
        return json.loads(path.read_text())
    text = remote.summary(flow_run_id) if remote is not None else None
    return json.loads(text) if text else None


def outputs_here(summary: dict[str, Any] | None, store: Store) -> dict[str, Any] | None:
    """The summary with each output a path in this artifact root: an entry another machine (another root) made is
    fetched from the shared store (an output in no entry this store can get is left as it was)."""
    if not summary:
        return summary
    keys = {stage.get("key") for stage in summary.get("stages", {}).values()} - {None}
    outputs = {}
    for name, value in summary.get("outputs", {}).items():
        parts = Path(value).parts
        at = next((i for i, part in enumerate(parts) if part in keys and i > 0), None)
        elsewhere = at is not None and not Path(value).is_relative_to(store.root)
        entry = store.get(parts[at - 1], parts[at]) if elsewhere else None
        outputs[name] = str(entry.path.joinpath(*parts[at + 1 :])) if entry is not None else value
    return {**summary, "outputs": outputs}


def recorded(root: Path, run_id: str, name: str) -> str | None:
    """A fact of the run's summary (its `run` section), None when not recorded."""
    try:
        return ((read_summary(root, run_id) or {}).get("run") or {}).get(name) or None
    except (OSError, ValueError):  # unreadable or not JSON: a run that recorded nothing
        return None


def instance_dir(root: Path, run_id: str) -> Path | None:
    """The instance folder a run trained from, as its summary recorded it: the subject the run belongs to."""
    found = recorded(root, run_id, "instance_dir")
    return Path(found) if found else None
