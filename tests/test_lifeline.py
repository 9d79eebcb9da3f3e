"""Nothing outlives a SIGKILLed boothflow: its temporary Prefect server, training child and UI server die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from conftest import BIN, REPO
from processes import started

GRACE_SECONDS = 5.0


def _tree(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _wait_for(what: Callable[[], bool], proc: subprocess.Popen, timeout: float, label: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"boothflow ended ({proc.returncode}) before {label}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {label} within {timeout} s"
        time.sleep(0.2)


def _alive(process: psutil.Process) -> bool:
    """Running, not just a zombie waiting for whoever adopted it to reap it."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_and_expect_no_survivors(proc: subprocess.Popen, tree: list[psutil.Process]) -> None:
    commands = {p.pid: _command(p)[:120] for p in tree[1:]}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + GRACE_SECONDS
    while (alive := [p for p in tree[1:] if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for survivor in alive:
        survivor.kill()
    assert not alive, "still running after a SIGKILL of boothflow: " + "; ".join(commands[p.pid] for p in alive)


def test_a_killed_run_leaves_neither_its_temporary_server_nor_its_training_child(ephemeral_env, tmp_path: Path):
    with started(
        [BIN / "boothflow", "run", "-c", "configs/demo.toml", "--artifacts", tmp_path / "a",
         "--set", "train.steps=100000", "--set", "train.checkpoint_every=0"],
        cwd=REPO, env=ephemeral_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        root = psutil.Process(proc.pid)

        def training() -> bool:
            return any("tasks.training" in _command(p) for p in _tree(root))

        _wait_for(training, proc, 180, "training child")
        tree = _tree(root)
        commands = [_command(p) for p in tree]
        assert any("prefect server start" in c for c in commands), commands  # the temporary server is ours, tied to us
        assert any(c.endswith("job.json") and "-m tasks.training" in c for c in commands), commands  # run directly
        _kill_and_expect_no_survivors(proc, tree)


def test_a_killed_ui_leaves_no_prefect_server(ephemeral_env, tmp_path: Path):
    from flows.publish import ui_file
    from flows.server import free_port

    root_dir = tmp_path / "a"
    with started(
        [BIN / "boothflow", "ui", "--port", str(free_port()), "--artifacts", root_dir],
        cwd=REPO, env=ephemeral_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        record = ui_file(root_dir)
        _wait_for(record.is_file, proc, 180, "UI record")
        assert json.loads(record.read_text())["api_url"].startswith("http://127.0.0.1:")
        tree = _tree(psutil.Process(proc.pid))
        assert len(tree) > 1, "the UI runs its Prefect server in a child process"
        _kill_and_expect_no_survivors(proc, tree)


def test_a_run_refused_before_its_first_stage_stops_the_server_that_was_booting(ephemeral_env, tmp_path: Path):
    """The temporary server starts booting before the config checks; a run they refuse says one line and stops it."""
    missing = tmp_path / "missing"
    with started(
        [BIN / "boothflow", "run", "-c", "configs/demo.toml", "--artifacts", tmp_path / "a",
         "--set", f"data.instance_dir='{missing}'"],
        cwd=REPO, env=ephemeral_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        root, seen = psutil.Process(proc.pid), {}
        while proc.poll() is None:
            seen |= {p: _command(p) for p in _tree(root)[1:] if p not in seen}
            time.sleep(0.05)
        out, err = proc.communicate()
        assert proc.returncode == 2 and "Traceback" not in out + err
        assert err.strip().splitlines() == [f"error: data.instance_dir = '{missing}' does not exist; set it to a "
                                            "folder of images"]  # fmt: skip
        assert any("prefect server start" in command for command in seen.values()), seen
        assert not [command for p, command in seen.items() if _alive(p)]
