"""The suite's one way to end what it starts: a process that ignores its stop signal, what it started (even outside
its group) and a command past its timeout all end, and the helper itself never raises."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from processes import run, started

SLEEP = "import time; time.sleep(600)"
STUBBORN = f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
inside = subprocess.Popen([sys.executable, "-c", {SLEEP!r}])
outside = subprocess.Popen([sys.executable, "-c", {SLEEP!r}], start_new_session=True)
print(inside.pid, outside.pid, flush=True)
time.sleep(600)
"""
LEAVES_A_CHILD = f"""
import pathlib, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {SLEEP!r}])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
"""


def _running(pids: list[int], timeout: float = 10) -> list[int]:
    """Those still running (not gone, not a zombie) once `timeout` has passed or none is."""
    deadline = time.monotonic() + timeout

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while (left := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_process_that_ignores_its_stop_signal_ends_with_all_it_started() -> None:
    with started([sys.executable, "-c", STUBBORN], grace=1, stdout=subprocess.PIPE, text=True) as proc:
        children = [int(pid) for pid in proc.stdout.readline().split()]
    assert proc.returncode == -signal.SIGKILL
    assert _running(children) == []


def test_what_a_command_leaves_running_ends_with_it(tmp_path: Path) -> None:
    pid = tmp_path / "pid"
    run([sys.executable, "-c", LEAVES_A_CHILD, pid], check=True)
    assert _running([int(pid.read_text())]) == []


def test_a_command_past_its_timeout_raises_and_ends() -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", SLEEP], timeout=1)
