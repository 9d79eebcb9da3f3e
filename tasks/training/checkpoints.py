"""Resumable checkpoints of the training child: written whole (on CUDA from a host copy, by a thread, while training
goes on), trusted only once marked complete, and the newest complete one restored by a rerun.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks.core.atomic import atomic_folder, replace_file
from tasks.core.faults import kill_if_injected
from tasks.training.job import TrainJob
from tasks.training.process import emit

COMPLETE = "COMPLETE"
TENSOR = "__tensor__"  # in state.pt, where a tensor of state.safetensors goes


def map_tensors(value: Any, change: Callable[[torch.Tensor, str], Any], path: str = "") -> Any:
    """`value` with `change(tensor, path)` in place of every tensor in it, through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return change(value, path)
    if isinstance(value, dict):
        return {key: map_tensors(item, change, f"{path}/{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(item, change, f"{path}/{i}") for i, item in enumerate(value))
    return value


class HostStaging:
    """Host buffers a checkpoint's state is copied into, kept from one checkpoint to the next (one write at a time
    reads them), so a checkpoint costs the loop one copy and no allocation. Pinned on CUDA, where the copies then go
    at full speed without blocking and are waited for once."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, value: Any) -> Any:
        copied = map_tensors(value, self._copy)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return copied

    def _copy(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        buffer = self.buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self.buffers[path] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        return buffer.copy_(tensor.detach(), non_blocking=True)


def _split(states: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`states` with a marker in place of each tensor, and the tensors by marker."""
    tensors: dict[str, torch.Tensor] = {}

    def take(tensor: torch.Tensor, path: str) -> dict[str, str]:
        tensors[path] = tensor.detach().contiguous()
        return {TENSOR: path}

    return map_tensors(states, take), tensors


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_split`."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {key: _join(item, tensors) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_join(item, tensors) for item in value)
    return value


def save_checkpoint(job: TrainJob, step: int, weights: dict, states: dict, metrics: list[dict]) -> None:
    """Written whole (an atomic folder, flushed to the disk), then marked complete (the mark flushed too, so a power
    cut leaves no complete checkpoint with missing bytes); keep only the newest K complete ones. `states` holds
    each part's state dict: its tensors go to safetensors, which writes without holding Python's lock (torch.save
    holds it, and a training thread beside the write would wait on it), the rest to state.pt."""
    final = job.checkpoints_dir / f"step-{step:06d}"
    skeleton, tensors = _split(states)
    with atomic_folder(final, replace=True) as folder:
        save_file({name: weight.detach().contiguous() for name, weight in weights.items()},
                  folder / "trainable.safetensors")  # fmt: skip
        kill_if_injected(f"train:mid-checkpoint-{step}", job.parent_pid)
        save_file(tensors, folder / "state.safetensors")
        torch.save(skeleton, folder / "state.pt")
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "step.json").write_text(json.dumps({"step": step, "num_processes": job.train.num_processes}))
    replace_file(final / COMPLETE, b"ok")
    for old in complete_checkpoints(job.checkpoints_dir)[: -job.train.keep_checkpoints]:
        shutil.rmtree(old)
    emit("checkpoint", name=final.name)  # the stage copies it to a shared store, for a resume on another machine


class CheckpointWriter:
    """Checkpoints written while training goes on: the loop waits only for a host copy of the state, and a background
    thread writes it. One write is in flight at a time: the next checkpoint, the export and the exit wait for it. A
    kill mid-write leaves a partial folder or one without its COMPLETE mark, and a resume trusts neither.

    In the background only on CUDA, where the copy goes to host memory. On a CPU it would be a second copy of the
    state in the memory training itself uses (and the memory plan sizes), so the checkpoint is written in place
    instead, though the thread would save a third to nearly all of the write's stall there, the more with a core to
    spare (benchmarks/checkpoint_stall.py)."""

    def __init__(self, job: TrainJob, background: bool) -> None:
        self.job, self.background, self.staging = job, background, HostStaging()
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def save(self, step: int, params: dict[str, torch.Tensor], state: dict[str, Any], metrics: list[dict]) -> None:
        self.wait()
        states = {name: part.state_dict() for name, part in state.items()}
        if not self.background:
            save_checkpoint(self.job, step, params, states, metrics)
            return
        weights, states = self.staging.copy((params, states))
        args = (step, weights, states, list(metrics))
        self.thread = threading.Thread(target=self._write, args=args, name=f"checkpoint-{step}")
        self.thread.start()

    def _write(self, step: int, weights: dict, states: dict, metrics: list[dict]) -> None:
        try:
            save_checkpoint(self.job, step, weights, states, metrics)
        except BaseException as err:  # raised in the training thread by the next wait()
            self.failure = err

    def wait(self) -> None:
        """Until the write in flight (if any) is done; a failed write fails training here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure


def clear_partial_checkpoints(job: TrainJob) -> None:
    """Folders a killed save left behind; never read, possibly gigabytes."""
    for folder in (job.checkpoints_dir, job.checkpoints_dir / "samples"):
        for leftover in folder.glob("step-*.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def step_folders(folder: Path) -> list[Path]:
    """The `step-NNNNNN` folders written whole, in step order."""
    return sorted(p for p in folder.glob("step-*") if ".partial-" not in p.name)


def complete_checkpoints(folder: Path) -> list[Path]:
    return [p for p in step_folders(folder) if (p / COMPLETE).is_file()]


class CannotResume(Exception):
    """Checkpoints this run cannot continue exactly; the message says how to go on."""


def restore(job: TrainJob, params: dict, state: dict) -> tuple[int, list[dict]]:
    """Load the newest complete checkpoint; returns (steps done, metrics so far), (0, []) without one.

    The LR schedule advances once per process and step, so a run resumes only with the process count it had."""
    checkpoints = complete_checkpoints(job.checkpoints_dir)
    if not checkpoints:
        return 0, []
    latest = checkpoints[-1]
    made = json.loads((latest / "step.json").read_text())
    processes = made.get("num_processes", 1)
    if processes != job.train.num_processes:
        raise CannotResume(
            f"the checkpoints in {job.checkpoints_dir} were made with train.num_processes={processes}; resume with"
            f" --set train.num_processes={processes} (and batch_size to match), or delete that folder to start over"
        )
    saved = load_file(latest / "trainable.safetensors")  # copied onto each parameter's own device below
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    # Onto the host first: load_state_dict puts the optimizer's state on its parameters' devices (every process
    # its own), where a plain load would put every process's copy on the device that saved it.
    skeleton = torch.load(latest / "state.pt", weights_only=True, map_location="cpu")
    tensors = latest / "state.safetensors"  # absent where state.pt holds its tensors itself
    saved_state = _join(skeleton, load_file(tensors) if tensors.is_file() else {})
    for name, part in state.items():
        part.load_state_dict(saved_state[name])
    return made["step"], json.loads((latest / "metrics.json").read_text())
