"""The DreamBooth training loop, run by the train stage as `accelerate launch -m tasks.stages.trainer JOB.json`.

It reports JSON lines on stdout and resumes from its newest complete checkpoint. Every random draw comes from
a generator seeded by (seed, step, sample), so a resumed run needs no RNG state and equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import broadcast_object_list
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from tasks.core.atomic import atomic_folder, link_or_copy
from tasks.core.config import TrainSection
from tasks.core.faults import fault, kill_if_injected
from tasks.core.seeds import generator
from tasks.sd import export, text
from tasks.sd.device import release
from tasks.sd.latent_dist import read_sizes, sample_latent, scale_latent
from tasks.sd.layout import MODEL_DIR
from tasks.sd.objective import Objective
from tasks.stages.checkpoints import (
    CannotResume,
    CheckpointWriter,
    clear_partial_checkpoints,
    complete_checkpoints,
    restore,
    step_folders,
)
from tasks.stages.train_job import TrainJob

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def emit(event: str, **fields: Any) -> None:
    """One JSON line for the train stage, from the main process only (the others train in step with it)."""
    if PartialState().is_main_process:
        print(json.dumps({"event": event, **fields}), flush=True)


class LatentData:
    """Cached latent distributions by sample id; draws a latent (and SDXL time ids) per sample and step."""

    def __init__(self, folder: Path) -> None:
        index = pd.read_csv(folder / "index.csv", dtype=str)
        vae = json.loads((folder / "vae.json").read_text())
        self.scaling, self.shift, self.flip = vae["scaling_factor"], vae["shift_factor"], vae["flip"]
        self.tensors = {row.id: load_file(folder / row.file) for row in index.itertuples()}
        self.time_ids = {
            (row.id, suffix): self._time_ids(folder / row.file, suffix)
            for row in index.itertuples()
            for suffix in ("", "_flipped")
        }
        self.ids = {kind: sorted(index[index.kind == kind].id) for kind in ("instance", "class")}

    @staticmethod
    def _time_ids(path: Path, suffix: str) -> torch.Tensor:
        """SDXL's micro-conditioning: (original h, w, crop top, left, target h, w); the crop corner of a
        mirrored image is measured in the mirrored frame."""
        meta = read_sizes(path)
        width, height = (int(v) for v in meta.get("original_size", "0,0").split(","))
        top, left = (int(v) for v in meta.get(f"crop_top_left{suffix}", meta.get("crop_top_left", "0,0")).split(","))
        target_w, target_h = (int(v) for v in meta.get("target_size", "0,0").split(","))
        return torch.tensor([[height, width, top, left, target_h, target_w]], dtype=torch.float32)

    def pick(self, kind: str, position: int, seed: int) -> str:
        """The sample at `position` of an endless sequence of seeded shuffles (one shuffle per epoch)."""
        ids = self.ids[kind]
        epoch, offset = divmod(position, len(ids))
        order = torch.randperm(len(ids), generator=generator(seed, "order", kind, epoch))
        return ids[int(order[offset])]

    def draw(self, sample_id: str, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.tensors[sample_id]
        suffix = "_flipped" if self.flip and torch.rand((), generator=rng) < 0.5 else ""
        z = sample_latent(item[f"mean{suffix}"][None], item[f"logvar{suffix}"][None], rng)
        return scale_latent(z, self.scaling, self.shift), self.time_ids[sample_id, suffix]


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


class Conditioner:
    """Text conditioning per batch: from the trained encoders each step, or from cached embeddings when frozen."""

    def __init__(self, job: TrainJob, encoders: list[torch.nn.Module] | None, device: torch.device) -> None:
        self.family, self.encoders = job.family, encoders
        prompts = job.prompts()
        if encoders is None:
            cached = {p: {name: t.to(device) for name, t in load_file(job.text_embeds[p]).items()} for p in prompts}
            self.cached = {p: text.Conditioning(t["hidden"], t.get("pooled")) for p, t in cached.items()}
        else:
            tokenizers = text.load_tokenizers(job.base, job.family)
            self.ids = {p: text.tokenize(tokenizers, p) for p in prompts}

    def __call__(self, prompts: list[str]) -> text.Conditioning:
        if self.encoders is None:
            parts = [self.cached[p] for p in prompts]
            pooled = None if parts[0].pooled is None else torch.cat([c.pooled for c in parts])
            return text.Conditioning(torch.cat([c.hidden for c in parts]), pooled)
        ids = [torch.cat(per_encoder) for per_encoder in zip(*(self.ids[p] for p in prompts), strict=True)]
        return text.encode(self.family, self.encoders, ids)


def predict(unet: torch.nn.Module, noisy: torch.Tensor, batch: Batch, cond: text.Conditioning) -> torch.Tensor:
    added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": batch.time_ids}
    return unet(noisy, batch.timesteps, cond.hidden, added_cond_kwargs=added, return_dict=False)[0]


def training_step(unet, conditioner: Conditioner, objective: Objective, batch: Batch) -> torch.Tensor:
    """One micro-batch: noisy latents in, loss out. Everything configurable was decided when building these."""
    noisy = objective.noisy(batch.latents, batch.noise, batch.timesteps)
    prediction = predict(unet, noisy, batch, conditioner(batch.prompts))
    return objective.loss(prediction, batch.latents, batch.noise, batch.timesteps, batch.kind_weights)


def lora_config(cfg: TrainSection, targets: list[str]) -> LoraConfig:
    """Alpha equals the rank: diffusers' and kohya's LoRA files do not record another alpha."""
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian", target_modules=targets)


def build_models(job: TrainJob, accelerator: Accelerator) -> tuple[torch.nn.Module, list[torch.nn.Module] | None]:
    """The UNet and (when trained) the text encoders, with LoRA adapters or full weights made trainable."""
    cfg = job.train
    frozen_dtype = DTYPES[cfg.mixed_precision] if cfg.method == "lora" else torch.float32
    # Loaded in its training precision: a float32 copy of SDXL's frozen UNet would be 10 GB for nothing.
    unet = UNet2DConditionModel.from_pretrained(job.base, subfolder="unet", torch_dtype=frozen_dtype)
    cuda = accelerator.device.type == "cuda"
    if cuda and cfg.channels_last:  # before LoRA: adapters stay contiguous, as the saved formats need them
        unet.to(memory_format=torch.channels_last)
    encoders = text.load_text_encoders(job.base, job.family) if cfg.train_text_encoder else None
    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(lora_config(cfg, list(cfg.lora_targets)))
        for encoder in encoders or []:
            encoder.requires_grad_(False)
            inject_adapter_in_model(lora_config(cfg, list(text.LORA_TARGETS)), encoder)
    for model in [unet, *(encoders or [])]:
        model.to(accelerator.device, dtype=frozen_dtype)
        model.train()
    if cfg.method == "lora":
        cast_training_params([unet, *(encoders or [])], dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders or []:
            encoder.gradient_checkpointing_enable()
    if cfg.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    if cuda and cfg.compile_unet:  # in place: the module, its parameters and its state dict keep their names
        unet.compile()
    return unet, encoders


def make_optimizer(job: TrainJob, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cfg = job.train
    if job.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)  # fmt: skip


def trainable(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{k}": p for name, m in models.items() for k, p in m.named_parameters() if p.requires_grad}


def save_sample_weights(job: TrainJob, step: int, unet, encoders) -> None:
    """Weights of step `step` for checkpoint samples, in the same format as the final output, kept beside the
    resume checkpoints (a stable place that survives a resume) and linked into the output at the end."""
    final = job.checkpoints_dir / "samples" / f"step-{step:06d}"
    if final.is_dir():
        return
    with atomic_folder(final) as folder:
        if job.train.method == "full":
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            if encoders:
                encoders[0].save_pretrained(folder / "text_encoder", safe_serialization=True)
        else:
            export.save_sdxl_lora(*lora_states(unet, encoders), folder)


def lora_states(unet, encoders) -> tuple[dict, dict | None, dict | None]:
    from peft.utils import get_peft_model_state_dict

    te_states = [get_peft_model_state_dict(e) for e in encoders] if encoders else [None, None]
    return get_peft_model_state_dict(unet), *te_states


def watch_parent(pid: int) -> None:
    """Exit when the stage process that launched us is gone, so no orphan keeps training."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def write_outputs(job: TrainJob, unet, encoders, params: dict, metrics: list[dict], processes: int) -> None:
    """The model folder (weights and card, as uploaded to the hub) and beside it the training's own records."""
    out, model = job.out_dir, job.out_dir / MODEL_DIR
    if dump := fault("save_trainable_to"):
        save_file({k: p.detach().contiguous() for k, p in params.items()}, Path(dump))
    if job.train.method == "full":
        text_encoder = encoders[0] if encoders else text.load_text_encoders(job.base, job.family)[0]
        facts = export.save_sd15_outputs(
            job.base, unet, text_encoder, model, job.safety_checker, job.vae_path, job.facts["base_model"]
        )
    else:
        facts = export.save_sdxl_lora(*lora_states(unet, encoders), model)
    kill_if_injected("train:mid-export", job.parent_pid)
    samples = step_folders(job.checkpoints_dir / "samples")
    for folder in samples:
        shutil.copytree(folder, out / "samples" / folder.name, copy_function=link_or_copy)
    cfg = job.train
    training = {"family": job.family, "method": cfg.method, "steps": cfg.steps,
                "sample_steps": [int(f.name.removeprefix("step-")) for f in samples],
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "num_processes": processes,
                "global_batch": cfg.batch_size * cfg.grad_accum * processes,
                **({"captions": job.facts["captions"]} if "captions" in job.facts else {})}  # fmt: skip
    (out / "training.json").write_text(json.dumps(training, indent=1))
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(metrics)
    final_loss = metrics[-1]["loss"] if metrics else None
    export.write_model_card(model, {**job.facts, **facts, "steps": job.train.steps, "final_loss": final_loss})


class PeakMemory:
    """Peak memory of this process, for memory.json: the training loop's and the export's, in MiB. On CUDA the
    allocator's peak (what the memory plan estimates); on a CPU the resident set's high-water mark."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if torch.cuda.is_available():
            self.peaks[phase] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peaks[phase] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux

    def write(self, folder: Path) -> None:
        kind = "cuda_allocated" if torch.cuda.is_available() else "cpu_rss"
        peaks = {phase: round(mib, 1) for phase, mib in self.peaks.items()}
        (folder / "memory.json").write_text(json.dumps({"kind": kind, "peak_mib": peaks}, indent=1))


class NonFiniteLoss(Exception):
    """A NaN or infinite loss: training stops at the next log step, naming the step it came at, and keeps the last
    good checkpoint."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at step {step}; stopped")
        self.step = step


@dataclass
class Training:
    """Everything one training run steps with, built once from its job (before `accelerator.prepare`)."""

    job: TrainJob
    accelerator: Accelerator
    objective: Objective
    data: LatentData
    unet: torch.nn.Module
    encoders: list[torch.nn.Module] | None
    conditioner: Conditioner
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any

    @property
    def state(self) -> dict[str, Any]:
        """Everything a resume needs besides weights; fp16's loss scaler too, or a resumed run would start
        unscaled."""
        state = {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler}
        return state | ({"scaler": self.accelerator.scaler} if self.accelerator.scaler is not None else {})

    @property
    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.unet, *(self.encoders or [])]

    def prepare(self) -> None:
        """Every trained module goes through accelerate (so DDP averages its gradients across processes)."""
        *modules, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            *self.trained_modules, self.optimizer, self.lr_scheduler
        )
        self.unet, self.encoders = modules[0], modules[1:] or None
        self.conditioner.encoders = self.encoders


def use_tf32(enabled: bool) -> None:
    """CUDA's float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs, float32 sums), or
    IEEE float32 throughout; the train key holds the choice."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def build_training(job: TrainJob) -> Training:
    cfg = job.train
    # Unused parameters (e.g. the last layer of an encoder whose penultimate states condition SDXL) get no gradient;
    # DDP must not wait for them. Without CUDA the processes talk over gloo.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp])  # fmt: skip
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    if accelerator.device.type == "cuda":
        use_tf32(cfg.tf32)
    scheduler = DDPMScheduler.from_pretrained(job.base, subfolder="scheduler")
    objective = Objective(scheduler, cfg.noise_offset, cfg.snr_gamma, job.prior_weight)
    unet, encoders = build_models(job, accelerator)
    params = trainable({"unet": unet, **{f"text_encoder_{i}": e for i, e in enumerate(encoders or [])}})
    optimizer = make_optimizer(job, list(params.values()))
    # The prepared scheduler advances once per process each step, so it is sized as diffusers' scripts size it.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * cfg.num_processes,
                                 num_training_steps=cfg.steps * cfg.num_processes)  # fmt: skip
    conditioner = Conditioner(job, encoders, accelerator.device)
    return Training(job, accelerator, objective, LatentData(job.latents_dir), unet, encoders, conditioner, params,
                    optimizer, lr_scheduler)  # fmt: skip


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


def apply_gradients(t: Training) -> None:
    """The recipe's update from the accumulated gradients: clipped to `max_grad_norm`, an optimizer step, the
    learning-rate schedule's step; the gradients are then dropped."""
    t.accelerator.clip_grad_norm_(list(t.params.values()), t.job.train.max_grad_norm)
    t.optimizer.step()
    t.lr_scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)


def optimizer_step(t: Training, step: int) -> float:
    """`optimizer_step_on_device` with its loss read at once, a host read every step that the training loop does
    without: for callers that want each step's number, like the GPU check."""
    loss = optimizer_step_on_device(t, step).item()
    if not math.isfinite(loss):
        raise NonFiniteLoss(step + 1, loss)
    return loss


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


def on_main_process(accelerator: Accelerator, write: Callable[[], None]) -> None:
    """Only the main process writes, between barriers: no process reads or races a half-written folder."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write()
    accelerator.wait_for_everyone()


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


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except Exception as err:  # one line for the stage's error; the traceback stays in the log above it
        import traceback

        traceback.print_exc()
        hint = "; lower train.batch_size or enable train.gradient_checkpointing" if "out of memory" in str(err) else ""
        emit("error", message=f"training failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}{hint}")
        sys.exit(1)
