"""Pretrain toy-sd on the toy world on CPU, in chunks that resume exactly where the last one stopped.

Phases: the VAE trains until its reconstructions pass the gate (colours, shapes and the DreamBooth subject
survive the 16 x 16 latent), then a fixed set of scenes is encoded once, then the UNet and text encoder train
on those latents (offset noise, captions with words dropped, empty captions for guidance), then the EMA
weights are saved as a diffusers folder and scored for caption fidelity with the analyser.

Every random draw comes from a generator seeded by (seed, phase, step), and model, optimiser and EMA state is
saved at the end of each chunk, so a run split into any number of chunks equals an unbroken one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from tasks.core.atomic import atomic_folder
from tasks.core.progress import Reporter, run_logger
from tasks.core.seeds import generator
from tasks.sd.device import cpu_threads
from tasks.sd.presets import SHIPPED_FOLDER
from tasks.toy.card import write_model_card
from tasks.toy.gate import caption_fidelity, passes, percent, to_pixels, vae_gate
from tasks.toy.model import TOY_SCHEDULER, toy_components, toy_pipeline, toy_tokenizer
from tasks.toy.plan import Plan, PretrainError, State
from tasks.toy.world import Scene, render, scene

STEPPED = ("vae", "unet")  # the phases that take many steps (encode and export are one unit each)


@functools.lru_cache(maxsize=1)
def training_scenes(plan: Plan) -> list[Scene]:
    """The scenes the UNet trains on, in the order of their encoded latents."""
    rng = plan.rng("scenes")
    return [scene(rng) for _ in range(plan.scenes)]


class Pretraining:
    """One pretraining run in `work`: its models, optimisers and state, loaded from the last chunk if any."""

    def __init__(self, work: Path, plan: Plan) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        from tasks.sd.objective import Objective

        self.work, self.plan = work, plan
        torch.set_num_threads(cpu_threads(plan.threads))
        self.tokenizer = toy_tokenizer(work / "tokenizer")
        self.vae, self.unet, self.text_encoder = toy_components(self.tokenizer)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
        self.params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=plan.unet_lr, weight_decay=1e-2)
        self.ema = EMAModel(self.params, decay=plan.ema_decay, use_ema_warmup=True)
        # The training scheduler boothflow's trainer builds from a toy-sd folder: DDPM on the saved betas.
        self.objective = Objective(DDPMScheduler.from_config(TOY_SCHEDULER), plan.noise_offset, 0.0, 1.0)
        self.latents: dict[str, torch.Tensor] | None = None  # the encoded scenes, read when the UNet phase runs
        self.state = State(plan=asdict(plan))
        if (work / "state.pt").is_file():
            self._load(torch.load(work / "state.pt", weights_only=True))
        self._clock = (time.process_time(), time.monotonic())
        if plan.vae_from and self.state.phase == "vae":
            self._adopt_vae(plan.vae_from)

    def _adopt_vae(self, model_id: str) -> None:
        """Start from a shipped model's VAE; it must pass the gate as a trained one would."""
        from diffusers import AutoencoderKL

        self.vae.load_state_dict(AutoencoderKL.from_pretrained(SHIPPED_FOLDER / model_id / "vae").state_dict())
        self.state.gate = vae_gate(self.vae, self.plan)
        run_logger().info("VAE of %s: gate %s", model_id, percent(self.state.gate))
        if not passes(self.state.gate, self.plan):
            raise PretrainError(
                f"the VAE of {model_id} misses the gate: {percent(self.state.gate)}"
                f" (needs {percent(dict(self.plan.gate))})"
            )
        self.state.phase = "encode"

    def account(self) -> None:
        """Add the CPU and wall time spent since the last call (or since loading) to the state."""
        cpu, wall = time.process_time(), time.monotonic()
        self.state.cpu_seconds += cpu - self._clock[0]
        self.state.wall_seconds += wall - self._clock[1]
        self._clock = (cpu, wall)

    def _load(self, saved: dict) -> None:
        # vae_steps may be raised to resume a run that missed its gate; a field newer than the run takes its default
        started = {k: v for k, v in {**asdict(Plan()), **saved["state"]["plan"]}.items() if k != "vae_steps"}
        if started != {k: v for k, v in self.state.plan.items() if k != "vae_steps"}:
            raise PretrainError(
                f"{self.work} holds a run started with another plan ({started['name']}); use another --out or"
                " delete that folder to start over"
            )
        for name in ("vae", "unet", "text_encoder", "vae_opt", "opt", "ema"):
            getattr(self, name).load_state_dict(saved[name])
        self.state = State(**saved["state"])

    def save(self) -> None:
        """Atomically: a killed save leaves the previous chunk's state in place."""
        saved = {name: getattr(self, name).state_dict() for name in ("vae", "unet", "text_encoder", "vae_opt", "opt")}
        saved |= {"ema": self.ema.state_dict(), "state": asdict(self.state)}
        partial = self.work / f"state.pt.partial-{os.getpid()}"
        torch.save(saved, partial)
        os.replace(partial, self.work / "state.pt")

    # --- phases -------------------------------------------------------------------------------------------

    def vae_step(self) -> None:
        if self.state.step >= self.plan.vae_steps:  # a rerun after a missed gate must not train on
            raise self._missed_gate()
        plan = self.plan
        rng = plan.rng("vae", self.state.step)
        pixels = to_pixels([render(scene(rng)) for _ in range(plan.vae_batch)])
        posterior = self.vae.encode(pixels).latent_dist
        draws = torch.Generator().manual_seed(rng.getrandbits(63))
        reconstruction = self.vae.decode(posterior.sample(generator=draws)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        anneal = max(0, self.state.step - plan.vae_anneal_from)
        for group in self.vae_opt.param_groups:
            group["lr"] = plan.vae_lr * _cosine(anneal, max(1, plan.vae_steps - plan.vae_anneal_from))
        self.vae_opt.zero_grad()
        loss.backward()
        self.vae_opt.step()
        self.state.step += 1
        self.state.losses.append(round(loss.item(), 5))
        if self.state.step % self.plan.gate_every == 0 or self.state.step >= self.plan.vae_steps:
            self.state.gate = vae_gate(self.vae, self.plan)
            run_logger().info("VAE step %d: gate %s", self.state.step, percent(self.state.gate))
            if passes(self.state.gate, self.plan):
                self.state.phase, self.state.step = "encode", 0
            elif self.state.step >= self.plan.vae_steps:
                raise self._missed_gate()

    def _missed_gate(self) -> PretrainError:
        return PretrainError(
            f"the VAE missed its gate after {self.state.step} steps: {percent(self.state.gate)}"
            f" (needs {percent(dict(self.plan.gate))}); raise Plan.vae_steps"
        )

    def encode(self) -> None:
        """Encode the training scenes once; the latents' spread sets the VAE's scaling factor, as in SD."""
        from safetensors.torch import save_file

        self.vae.eval()
        means, logvars = [], []
        scenes = training_scenes(self.plan)
        with torch.no_grad():
            for start in range(0, len(scenes), 64):
                posterior = self.vae.encode(to_pixels([render(s) for s in scenes[start : start + 64]])).latent_dist
                means.append(posterior.mean)
                logvars.append(posterior.logvar)
        mean, logvar = torch.cat(means), torch.cat(logvars)
        save_file({"mean": mean.contiguous(), "logvar": logvar.contiguous()}, self.work / "latents.safetensors")
        self.state.scaling_factor = float(1.0 / mean.std())
        self.state.phase, self.state.step, self.state.losses = "unet", 0, []

    def unet_step(self, latents: dict[str, torch.Tensor], scenes: list[Scene]) -> None:
        plan, step = self.plan, self.state.step
        rng = plan.rng("unet", step)
        picks = [rng.randrange(len(scenes)) for _ in range(plan.unet_batch)]
        captions = [self._caption(scenes[i], rng) for i in picks]
        draws = generator(plan.seed, "unet-noise", step)
        mean, logvar = latents["mean"][picks], latents["logvar"][picks]
        sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=draws)
        clean = sample * self.state.scaling_factor
        noise, timesteps = self.objective.draw(clean, draws)
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noisy = self.objective.noisy(clean, noise, timesteps)
        prediction = self.unet(noisy, timesteps, self.text_encoder(ids)[0]).sample
        loss = self.objective.loss(prediction, clean, noise, timesteps, self.objective.kind_weights(1))
        for group in self.opt.param_groups:
            group["lr"] = plan.unet_lr * min(1.0, (step + 1) / plan.warmup) * _cosine(step, plan.unet_steps)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.ema.step(self.params)
        self.state.step += 1
        self.state.losses.append(round(loss.item(), 5))
        if self.state.step >= plan.unet_steps:
            self.state.phase = "export"

    def advance(self, out: Path) -> None:
        """One unit of the current phase: a training step, the encoding, or the export."""
        if self.state.phase == "vae":
            self.vae_step()
        elif self.state.phase == "encode":
            run_logger().info("encoding %d scenes", self.plan.scenes)
            self.encode()
        elif self.state.phase == "unet":
            if self.latents is None:
                from safetensors.torch import load_file

                self.latents = load_file(self.work / "latents.safetensors")
            self.unet_step(self.latents, training_scenes(self.plan))
        else:
            run_logger().info("saving and scoring the model")
            self.export(out)

    def _caption(self, item: Scene, rng: random.Random) -> str:
        plan = self.plan
        if rng.random() < plan.drop_caption:
            return ""
        return item.caption(rng.random() >= plan.drop_colour, rng.random() >= plan.drop_background)

    def export(self, out: Path) -> None:
        """Save the EMA weights as a diffusers folder, score its caption fidelity, write the model card."""
        self.ema.copy_to(self.params)
        self.vae.register_to_config(scaling_factor=self.state.scaling_factor)
        with atomic_folder(out, replace=True) as partial:
            toy_pipeline(self.vae, self.unet, self.text_encoder, self.tokenizer).save_pretrained(partial)
            self.state.fidelity = caption_fidelity(partial, self.plan)
            self.account()
            scores = self.scores()
            (partial / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
            write_model_card(partial)
        self.state.phase = "done"

    def scores(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "vae_gate": self.state.gate,
            "scaling_factor": self.state.scaling_factor,
            "caption_fidelity": self.state.fidelity,
            "cpu_seconds": round(self.state.cpu_seconds),
            "wall_seconds": round(self.state.wall_seconds),
            "final_loss": float(np.mean(self.state.losses[-100:])) if self.state.losses else None,
        }


def _cosine(step: int, total: int, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + float(np.cos(np.pi * min(step, total) / total)))


def pretrain(out: Path, plan: Plan, minutes: float) -> State:
    """Train for about `minutes` (at least one step) from where the last chunk stopped; returns the state (phase
    "done" at the end).

    `out` receives the finished model; its checkpoints live beside it in `<out>.work`.
    """
    work = out.with_name(f"{out.name}.work")
    work.mkdir(parents=True, exist_ok=True)
    with FileLock(work / "lock"):  # one process per run: a second waits, then goes on from where the first left
        for stale in [*work.glob("state.pt.partial-*"), *out.parent.glob(f"{out.name}.partial-*")]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        return _train(Pretraining(work, plan), out, plan, minutes)


def _train(run: Pretraining, out: Path, plan: Plan, minutes: float) -> State:
    if run.state.phase == "done" and not out.is_dir():  # the model was deleted: write it again from the state
        run.state.phase = "export"
    deadline = time.monotonic() + 60 * minutes
    try:
        with contextlib.ExitStack() as bars:
            shown = None
            while run.state.phase != "done":
                phase = run.state.phase
                if phase in STEPPED and shown != phase:  # one bar per training phase, from the step it is at
                    bars.close()
                    total = plan.vae_steps if phase == "vae" else plan.unet_steps
                    reporter = bars.enter_context(Reporter(total, f"pretrain toy-sd: {phase} steps"))
                    reporter.advance(run.state.step)
                    shown = phase
                run.advance(out)
                if phase in STEPPED:
                    reporter.advance()
                if time.monotonic() >= deadline:  # checked after a step: every call gets at least one done
                    break
    except PretrainError:
        run.account()
        run.save()
        raise
    # Interrupted (Ctrl-C, kill) mid-step, nothing is saved: the previous chunk's state is still whole.
    run.account()
    run.save()
    return run.state
