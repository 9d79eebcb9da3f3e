"""The training from its job to its outputs: restore, the steps with their logging, sample weights and checkpoints,
then the export. The device is read only at log steps."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tasks.core.faults import fault
from tasks.sd.device import release
from tasks.training.build import Training, build_training
from tasks.training.checkpoints import (
    CannotResume,
    CheckpointWriter,
    clear_partial_checkpoints,
    complete_checkpoints,
    restore,
)
from tasks.training.job import TrainJob
from tasks.training.outputs import save_sample_weights, write_outputs
from tasks.training.process import PeakMemory, emit, watch_parent
from tasks.training.step import NonFiniteLoss, optimizer_step_on_device


def main(job_path: Path) -> None:
    job = TrainJob.model_validate_json(job_path.read_text())
    cfg = job.train
    watch_parent(job.parent_pid)
    peaks = PeakMemory()
    t = build_training(job)
    on_main_process(t.accelerator, lambda: clear_partial_checkpoints(job))
    try:
        start, metrics = restore(job, t.params, t.state)
    except CannotResume as err:
        emit("error", message=str(err))
        sys.exit(3)
    if start:
        emit("resume", step=start, checkpoint=str(complete_checkpoints(job.checkpoints_dir)[-1]))
    t.prepare()
    try:
        run_steps(t, start, metrics)
    except NonFiniteLoss as err:
        emit("error", step=err.step, message=str(err))
        sys.exit(3)
    peaks.mark("train")
    accelerator, unet = t.accelerator, t.accelerator.unwrap_model(t.unet)
    encoders = [accelerator.unwrap_model(e) for e in t.encoders] if t.encoders else None
    params = t.params
    accelerator.free_memory()  # accelerate's own references to the prepared modules, optimizer and scheduler
    del t  # the export needs only the weights: the optimizer's state and the gradients go first
    release()

    def export_outputs() -> None:
        write_outputs(job, unet, encoders, params, metrics, accelerator.num_processes)
        peaks.mark("export")
        peaks.write(job.out_dir)

    on_main_process(accelerator, export_outputs)
    emit("done", steps=cfg.steps, resumed_from=start)


def run_steps(t: Training, start: int, metrics: list[dict]) -> None:
    """Steps `start` to the end. The device is read only at log steps; a checkpoint comes every `checkpoint_every`
    steps or, at a log step, after `checkpoint_minutes`, whichever is first (written in the background on CUDA)."""
    cfg = t.job.train
    log, checkpointed = LossLog(metrics), time.monotonic()
    checkpoints = CheckpointWriter(t.job, background=t.accelerator.device.type == "cuda")
    try:
        for step in range(start, cfg.steps):
            done, last = step + 1, step + 1 == cfg.steps
            lr = t.lr_scheduler.get_last_lr()[0]  # the rate this step uses: its update then advances the schedule
            log.add(done, optimizer_step_on_device(t, step), lr)
            sample = bool(cfg.sample_every) and done % cfg.sample_every == 0 and not last
            checkpoint = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0 and not last
            if done % cfg.log_every == 0 or sample or checkpoint or last:
                log.read()
                checkpoint = checkpoint or (not last and minutes_passed(checkpointed, cfg.checkpoint_minutes))
            if sample:
                unet = t.accelerator.unwrap_model(t.unet)
                encoders = [t.accelerator.unwrap_model(e) for e in t.encoders or []]
                on_main_process(t.accelerator, partial(save_sample_weights, t.job, done, unet, encoders))
            if checkpoint:
                on_main_process(t.accelerator, partial(checkpoints.save, done, t.params, t.state, metrics))
                checkpointed = time.monotonic()
            if fault("kill_train_after_step") == done:  # once this step is reported and every checkpoint written
                log.read()
                checkpoints.wait()
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        checkpoints.wait()


class LossLog:
    """Step losses stay on the device until a log step reads every pending one at once (one host read) into metrics
    rows and progress events. Log steps come every `log_every` steps, before anything is written (sample weights,
    checkpoints, the export) and at the end: a NaN or infinite loss is named by its own step and stops training
    before any weights it touched are written."""

    def __init__(self, metrics: list[dict]) -> None:
        self.metrics, self.started = metrics, time.monotonic()
        self.pending: list[tuple[int, torch.Tensor, float, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, lr, round(time.monotonic() - self.started, 3)))

    def read(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([loss for _, loss, _, _ in self.pending]).tolist()
        pending, self.pending = self.pending, []
        for (step, _, lr, seconds), loss in zip(pending, losses, strict=True):
            if not math.isfinite(loss):  # every process reads the same reduced losses, so all stop together
                raise NonFiniteLoss(step, loss)
            row = {"step": step, "loss": loss, "lr": lr, "seconds": seconds}
            self.metrics.append(row)
            emit("step", **row)


def minutes_passed(since: float, minutes: float) -> bool:
    """Whether `minutes` (0: never) have passed since `since` by the main process's clock; every process gets its
    answer, so all of them checkpoint at the same step."""
    if not minutes:
        return False
    return broadcast_object_list([time.monotonic() - since >= 60 * minutes])[0]


def on_main_process(accelerator: Accelerator, write: Callable[[], None]) -> None:
    """Only the main process writes, between barriers: no process reads or races a half-written folder."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write()
    accelerator.wait_for_everyone()
