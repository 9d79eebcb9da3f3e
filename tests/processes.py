"""Processes the tests start, and the one way they end: each in its own process group, stopped by the test that
started it with a signal, a bounded wait and then SIGKILL to its group and all it started, so none outlives the suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

GRACE = 30.0  # seconds a process has to stop after its first signal
REAPED = 10.0  # seconds to wait for a killed process's exit status: a process stuck in the kernel must not hang us


def start(command: list, log: Path | None = None, **popen) -> subprocess.Popen:
    """`subprocess.Popen(command, **popen)` as the leader of a new process group (and session); with `log`, its
    output (stdout and stderr) goes to that file."""
    if log is None:
        return subprocess.Popen(list(map(str, command)), start_new_session=True, **popen)
    with log.open("w") as out:
        return start(command, stdout=out, stderr=subprocess.STDOUT, **popen)


def stop(*procs: subprocess.Popen, first: int = signal.SIGTERM, grace: float = GRACE) -> None:
    """Send `first` to each process and its group, give them `grace` seconds together to exit, then SIGKILL every
    group and every process they had started (those that left the group too). Never raises."""
    family = [child for proc in procs for child in _descendants(proc)]
    for proc in procs:
        _signal(proc, first)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        _signal(proc, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()  # psutil checks it is still the process it saw, not a reused pid
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(REAPED)


@contextlib.contextmanager
def started(command: list, first: int = signal.SIGTERM, grace: float = GRACE, **popen) -> Iterator[subprocess.Popen]:
    """`start(command, **popen)`, stopped (`stop(proc, first=first, grace=grace)`) when the block ends, however."""
    proc = start(command, **popen)
    try:
        yield proc
    finally:
        stop(proc, first=first, grace=grace)


def run(
    command: list, timeout: float = 600, check: bool = False, capture_output: bool = False, **popen
) -> subprocess.CompletedProcess:
    """`subprocess.run` for tests: in its own group, which is killed (with whatever the command left running in it)
    when it exits, when `timeout` passes or when the test is interrupted."""
    if capture_output:
        popen |= {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with started(command, grace=0, **popen) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.Error:
        return []


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the group the process leads (once: a second SIGINT may mean "stop now"), even when the process has
    exited, for what it left in the group; to the process alone if it leads none (one the suite did not start)."""
    if proc.poll() is None and os.getpgid(proc.pid) != proc.pid:
        proc.send_signal(sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
