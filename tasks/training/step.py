"""One optimizer step, top to bottom: draw each micro-batch (samples, latents, noise, timesteps, prompts), noise the
latents, predict, weigh the loss, backpropagate; then clip, step the optimizer and the learning-rate schedule.

Everything is drawn on the CPU from generators seeded by the sample's global slot, so the numbers never depend on
the device or on how many processes share the global batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

from tasks.core.faults import fault
from tasks.core.seeds import generator
from tasks.sd import text
from tasks.sd.objective import Objective
from tasks.training.build import Training
from tasks.training.conditioning import Conditioner
from tasks.training.data import LatentData
from tasks.training.job import TrainJob


def optimizer_step_on_device(t: Training, step: int) -> torch.Tensor:
    """One optimizer step of `grad_accum` micro-batches, gradients averaged across processes on the last one;
    returns the step's loss over the global batch (the same on every process) on the device, unread, so the host
    never waits for the device here. The micro-batch losses are summed in float64, as Python sums floats."""
    cfg, rank = t.job.train, t.accelerator.process_index
    total = torch.zeros((), dtype=torch.float64, device=t.accelerator.device)
    for micro in range(cfg.grad_accum):
        batch = make_batch(t.data, t.objective, t.job, step, micro, rank).to(t.accelerator.device)
        with contextlib.ExitStack() as stack:
            if micro < cfg.grad_accum - 1:  # accumulate locally; synchronise once per optimizer step
                for module in t.trained_modules:
                    stack.enter_context(t.accelerator.no_sync(module))
            with t.accelerator.autocast():
                loss = training_step(t.unet, t.conditioner, t.objective, batch) / cfg.grad_accum
            if fault("nan_at_step") == step + 1:
                loss = loss * float("nan")
            global_loss = t.accelerator.reduce(loss.detach(), reduction="mean")
            t.accelerator.backward(loss)
        total += global_loss.double()
    apply_gradients(t)
    return total


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    kind_weights: torch.Tensor
    prompts: list[str]
    time_ids: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """The batch on the model's device; it is drawn on the CPU so its numbers never depend on the device. CUDA
        gets it from pinned memory without waiting, so the host draws the next batch while the device computes."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)

        tensors = ("latents", "noise", "timesteps", "kind_weights", "time_ids")
        return replace(self, **{name: move(getattr(self, name)) for name in tensors})


def make_batch(data: LatentData, objective: Objective, job: TrainJob, step: int, micro: int, rank: int = 0) -> Batch:
    """This process's slice of one global micro-batch: instance samples (then as many class samples with prior
    preservation, the layout the objective's kind weights assume), each with its own generator seeded by its global
    slot, so what is drawn does not depend on how many processes share the global batch (batch_size x
    num_processes)."""
    cfg = job.train
    kinds = ["instance"] + (["class"] if job.class_prompt else [])
    width = cfg.batch_size * cfg.num_processes
    rows = []
    for kind in kinds:
        for slot in range(rank * cfg.batch_size, (rank + 1) * cfg.batch_size):
            position = (step * cfg.grad_accum + micro) * width + slot
            sample_id = data.pick(kind, position, cfg.seed)
            rng = generator(cfg.seed, "sample", step, micro, slot, kind, sample_id)
            latent, time_ids = data.draw(sample_id, rng)
            noise, timestep = objective.draw(latent, rng)
            prompt = job.class_prompt if kind == "class" else job.captions.get(sample_id, job.instance_prompt)
            rows.append((latent, noise, timestep, prompt, time_ids))
    latents, noise, timesteps, prompts, time_ids = zip(*rows, strict=True)
    return Batch(torch.cat(latents), torch.cat(noise), torch.cat(timesteps), objective.kind_weights(len(kinds)),
                 list(prompts), torch.cat(time_ids))  # fmt: skip


def training_step(unet, conditioner: Conditioner, objective: Objective, batch: Batch) -> torch.Tensor:
    """One micro-batch: noisy latents in, loss out. Everything configurable was decided when building these."""
    noisy = objective.noisy(batch.latents, batch.noise, batch.timesteps)
    prediction = predict(unet, noisy, batch, conditioner(batch.prompts))
    return objective.loss(prediction, batch.latents, batch.noise, batch.timesteps, batch.kind_weights)


def predict(unet: torch.nn.Module, noisy: torch.Tensor, batch: Batch, cond: text.Conditioning) -> torch.Tensor:
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": batch.time_ids}
    return unet(noisy, batch.timesteps, cond.hidden, added_cond_kwargs=added, return_dict=False)[0]


def apply_gradients(t: Training) -> None:
    """The recipe's update from the accumulated gradients: clipped to `max_grad_norm`, an optimizer step, the
    learning-rate schedule's step; the gradients are then dropped."""
    t.accelerator.clip_grad_norm_(list(t.params.values()), t.job.train.max_grad_norm)
    t.optimizer.step()
    t.lr_scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)


class NonFiniteLoss(Exception):
    """A NaN or infinite loss: training stops at the next log step, naming the step it came at, and keeps the last
    good checkpoint."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at step {step}; stopped")
        self.step = step


def optimizer_step(t: Training, step: int) -> float:
    """`optimizer_step_on_device` with its loss read at once, a host read every step that the training loop does
    without: for callers that want each step's number, like the GPU check."""
    loss = optimizer_step_on_device(t, step).item()
    if not math.isfinite(loss):
        raise NonFiniteLoss(step + 1, loss)
    return loss
