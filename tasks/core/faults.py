"""Faults injected by tests from outside the config: a JSON file named by BOOTHFLOW_FAULTS.

Never part of a cache key or a flow parameter; reread on every call, so deleting the file ends the fault.
`kill_at` names one point where boothflow is SIGKILLed: `<store stage>:before-manifest`, `<store stage>:before-rename`,
`<store stage>:after-<k>` (the k-th entry of that store stage this process committed, e.g. an item),
`train:mid-checkpoint-<step>`, `train:mid-export`, `<store stage>:before-publish` (the shared store holds the entry's
blobs, not its manifest), `<store stage>:mid-download-<k>` (k files of a shared store's entry downloaded) and
`train:uploaded-<checkpoint>` (e.g. `train:uploaded-step-000004`: that checkpoint is in the shared store). With
`"once": true` the file is removed before the kill, so the process that runs again (a retry) is not killed. `hold_at`
names a point where a process waits for as long as the file names it, so that two processes can meet there (or a
test can kill a machine there): `<store stage>:before-publish` or `train:uploaded-<checkpoint>`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

ENV = "BOOTHFLOW_FAULTS"
_passed: Counter[str] = Counter()


def fault(name: str) -> Any:
    """The value of fault `name` (e.g. kill_train_after_step: 3), or None when no such fault is set."""
    path = os.environ.get(ENV)
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text()).get(name)


def kill_if_injected(point: str, flow_pid: int = 0) -> None:
    """SIGKILL boothflow at `point` when `kill_at` names it; from the training child, the flow process `flow_pid`
    first, so the whole run dies at once, as it would when the machine loses power."""
    if fault("kill_at") != point:
        return
    if fault("once"):
        Path(os.environ[ENV]).unlink(missing_ok=True)
    if flow_pid > 0:
        os.kill(flow_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_if_injected_after(series: str) -> None:
    """A point passed many times (each item of a stage): the k-th pass in this process is point `<series>-<k>`."""
    _passed[series] += 1
    kill_if_injected(f"{series}-{_passed[series]}")


def hold_if_injected(point: str) -> None:
    """Wait at `point` while `hold_at` names it, having touched `<faults file>.held-<pid>` to say so."""
    if fault("hold_at") != point:
        return
    Path(f"{os.environ[ENV]}.held-{os.getpid()}").touch()
    while fault("hold_at") == point:
        time.sleep(0.1)
