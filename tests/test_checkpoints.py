"""Checkpoints written in the background: each holds the state of its own step while training goes on, one write at
a time, a failed write fails training, and a kill mid-write leaves nothing a resume trusts."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from processes import run

from tasks.core.config import TrainSection
from tasks.core.faults import ENV as FAULTS_ENV
from tasks.training import checkpoints
from tasks.training.checkpoints import CheckpointWriter, clear_partial_checkpoints, complete_checkpoints, restore
from tasks.training.job import TrainJob

REPO = Path(__file__).resolve().parents[1]


def _job(folder: Path) -> TrainJob:
    return TrainJob(
        family="sd15", base=folder, latents_dir=folder, out_dir=folder, checkpoints_dir=folder,
        train=TrainSection(), optimizer="adamw", instance_prompt="", class_prompt=None, prior_weight=0.0,
        text_embeds=None, parent_pid=0, facts={},
    )  # fmt: skip


class Model:
    """A tiny model and its AdamW, stepped by hand: what a checkpoint holds, without a UNet."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.module = torch.nn.Linear(8, 8)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)
        self.params, self.state = dict(self.module.named_parameters()), {"optimizer": self.optimizer}

    def step(self) -> None:
        self.module(torch.ones(2, 8)).square().sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def test_a_background_checkpoint_holds_its_steps_state_while_training_goes_on(tmp_path: Path, monkeypatch) -> None:
    model, gate, write = Model(), threading.Event(), checkpoints.save_checkpoint
    model.step()
    weights = {name: p.detach().clone() for name, p in model.params.items()}
    moments = {name: model.optimizer.state[p]["exp_avg"].clone() for name, p in model.params.items()}

    def gated(*args) -> None:
        gate.wait(30)
        write(*args)

    monkeypatch.setattr(checkpoints, "save_checkpoint", gated)
    writer = CheckpointWriter(_job(tmp_path), background=True)
    writer.save(1, model.params, model.state, [{"step": 1}])
    assert writer.thread.is_alive()  # the write waits at the gate; the loop does not
    model.step()
    gate.set()
    writer.wait()

    fresh = Model(seed=1)
    assert restore(_job(tmp_path), fresh.params, fresh.state) == (1, [{"step": 1}])
    for name, param in fresh.params.items():
        assert torch.equal(param, weights[name]) and not torch.equal(param, model.params[name])
        assert torch.equal(fresh.optimizer.state[param]["exp_avg"], moments[name])
    assert fresh.optimizer.state[fresh.params["weight"]]["step"] == 1


def test_the_next_checkpoint_waits_for_the_one_in_flight(tmp_path: Path, monkeypatch) -> None:
    model, events, write = Model(), [], checkpoints.save_checkpoint

    def slow(job: TrainJob, step: int, *rest) -> None:
        events.append(("start", step))
        time.sleep(0.2)
        write(job, step, *rest)
        events.append(("end", step))

    monkeypatch.setattr(checkpoints, "save_checkpoint", slow)
    writer = CheckpointWriter(_job(tmp_path), background=True)
    for step in (1, 2):
        model.step()
        writer.save(step, model.params, model.state, [])
    writer.wait()
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


def test_a_failed_write_fails_training_at_the_next_wait(tmp_path: Path, monkeypatch) -> None:
    def full(*_) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints, "save_checkpoint", full)
    writer, model = CheckpointWriter(_job(tmp_path), background=True), Model()
    writer.save(1, model.params, model.state, [])
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # reported once


KILLED_MID_WRITE = """
import sys
from pathlib import Path
from test_checkpoints import Model, _job
from tasks.training.checkpoints import CheckpointWriter

model, writer = Model(), CheckpointWriter(_job(Path(sys.argv[1])), background=True)
for step in (1, 2):  # the fault kills the process while the second checkpoint is written
    model.step()
    writer.save(step, model.params, model.state, [{"step": step}])
    writer.wait()
"""


def test_a_kill_while_a_checkpoint_is_written_leaves_nothing_a_resume_trusts(tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"kill_at": "train:mid-checkpoint-2"}))
    env = {**os.environ, FAULTS_ENV: str(faults), "PYTHONPATH": str(REPO / "tests")}
    folder = tmp_path / "checkpoints"
    proc = run([sys.executable, "-c", KILLED_MID_WRITE, folder], timeout=120, cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [p.name for p in folder.glob("step-000002*")] != []  # it was killed while writing step 2
    assert [p.name for p in complete_checkpoints(folder)] == ["step-000001"]
    fresh = Model()
    assert restore(_job(folder), fresh.params, fresh.state) == (1, [{"step": 1}])
    clear_partial_checkpoints(_job(folder))
    assert [p.name for p in folder.iterdir()] == ["step-000001"]
