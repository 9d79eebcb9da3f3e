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
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from tasks.core.atomic import atomic_folder
from tasks.core.progress import Reporter, run_logger
from tasks.core.seeds import derive_seed, generator
from tasks.sd.models import SHIPPED_FOLDER
from tasks.toy.model import TOY_SCHEDULER, toy_components, toy_pipeline, toy_tokenizer
from tasks.toy.score import Reading, matches, parse, read
from tasks.toy.world import PALETTE, SHAPES, Scene, render, scene, subject_scene

STEPPED = ("vae", "unet")  # the phases that take many steps (encode and export are one unit each)
GATE = {"colour": 0.95, "background": 0.99, "shape": 0.90, "subject": 0.90}
EXAMPLE_CAPTIONS = (
    "a photo of a red circle on a blue background",
    "a photo of a green and blue square on a white background",
)
CARD_TEMPLATE = resources.files(__package__) / "templates" / "model_card.md"
NOTES = "## Notes from the run that made these weights"  # written by hand after a run; kept when the card is rewritten


@dataclass(frozen=True)
class Plan:
    """How long each phase trains; `FULL` makes the shipped model, `QUICK` a rough one in a few minutes."""

    name: str = "full"
    seed: int = 0
    gate: tuple[tuple[str, float], ...] = tuple(GATE.items())  # the analyser's floors on VAE reconstructions
    vae_from: str = ""  # a shipped model whose VAE to start from instead of training one (must pass the gate)
    vae_steps: int = 2000  # at most; the UNet starts as soon as the gate passes
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_anneal_from: int = 1200  # constant LR until this step, then cosine decay to a tenth at vae_steps
    gate_every: int = 200
    gate_images: int = 256
    scenes: int = 16384  # encoded once; captions are drawn afresh each step
    unet_steps: int = 2500
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 200
    noise_offset: float = 0.1  # as configs/toy.toml fine-tunes with it
    drop_colour: float = 0.15
    drop_background: float = 0.15
    drop_caption: float = 0.1
    ema_decay: float = 0.999  # the most: diffusers' EMA warm-up makes it 1 - (1 + step) ** -2/3 until then
    eval_steps: int = 25
    eval_guidance: float = 5.0
    threads: int = 2


FULL = Plan()
# Quick: a rough model in a few minutes, for tests and a first look. Training a VAE to its gate takes most of an
# hour on a CPU, so it starts from the shipped toy-sd's VAE (checked against the gate) and trains the UNet briefly.
QUICK = replace(
    FULL,
    name="quick",
    vae_from="toy-sd",  # the gate's held-out scenes are the full plan's, so it passes as it did there
    scenes=2048,
    unet_steps=250,
    unet_batch=32,
    warmup=50,
)


class PretrainError(Exception):
    """Pretraining cannot go on (the VAE missed its gate); the message carries the measured figures."""


@dataclass
class State:
    """Where a pretraining run is; saved with the weights after every chunk."""

    plan: dict[str, Any] = field(default_factory=dict)  # what the run was started with; a resume must agree
    phase: str = "vae"  # vae -> encode -> unet -> export -> done
    step: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    gate: dict[str, float] = field(default_factory=dict)
    scaling_factor: float = 1.0
    losses: list[float] = field(default_factory=list)
    fidelity: dict[str, float] = field(default_factory=dict)


def _rng(plan: Plan, *parts: Any) -> random.Random:
    return random.Random(derive_seed(plan.seed, *parts))


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def _images(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def _held_out(plan: Plan) -> tuple[list[Scene], list[Scene]]:
    rng = _rng(plan, "held-out")
    return [scene(rng) for _ in range(plan.gate_images)], [subject_scene(rng) for _ in range(plan.gate_images)]


def score_readings(readings: list[Reading], scenes: list[Scene]) -> dict[str, float]:
    """Share of images whose colour, background and shape the analyser reads as the scene has them."""
    shown = [r.shows(s) for r, s in zip(readings, scenes, strict=True)]
    return {name: float(np.mean([s[name] for s in shown])) for name in ("colour", "background", "shape")}


def vae_gate(vae: torch.nn.Module, plan: Plan) -> dict[str, float]:
    """The analyser's scores on reconstructions of held-out scenes, and the share of subjects that survive."""
    plain, subjects = _held_out(plan)
    readings: dict[str, list[Reading]] = {"plain": [], "subject": []}
    vae.eval()
    with torch.no_grad():
        for name, scenes in (("plain", plain), ("subject", subjects)):
            for start in range(0, len(scenes), 32):
                batch = _pixels([render(s) for s in scenes[start : start + 32]])
                readings[name] += [read(i) for i in _images(vae(batch, sample_posterior=False).sample)]
    vae.train()
    return score_readings(readings["plain"], plain) | {
        "subject": float(np.mean([r.subject for r in readings["subject"]]))
    }


@functools.lru_cache(maxsize=1)
def training_scenes(plan: Plan) -> list[Scene]:
    """The scenes the UNet trains on, in the order of their encoded latents."""
    rng = _rng(plan, "scenes")
    return [scene(rng) for _ in range(plan.scenes)]


def passes(scores: dict[str, float], plan: Plan) -> bool:
    return all(scores[name] >= floor for name, floor in plan.gate)


class Pretraining:
    """One pretraining run in `work`: its models, optimisers and state, loaded from the last chunk if any."""

    def __init__(self, work: Path, plan: Plan) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        from tasks.sd.objective import Objective

        self.work, self.plan = work, plan
        torch.set_num_threads(plan.threads)
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
        run_logger().info("VAE of %s: gate %s", model_id, _percent(self.state.gate))
        if not passes(self.state.gate, self.plan):
            raise PretrainError(
                f"the VAE of {model_id} misses the gate: {_percent(self.state.gate)}"
                f" (needs {_percent(dict(self.plan.gate))})"
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
        rng = _rng(plan, "vae", self.state.step)
        pixels = _pixels([render(scene(rng)) for _ in range(plan.vae_batch)])
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
            run_logger().info("VAE step %d: gate %s", self.state.step, _percent(self.state.gate))
            if passes(self.state.gate, self.plan):
                self.state.phase, self.state.step = "encode", 0
            elif self.state.step >= self.plan.vae_steps:
                raise self._missed_gate()

    def _missed_gate(self) -> PretrainError:
        return PretrainError(
            f"the VAE missed its gate after {self.state.step} steps: {_percent(self.state.gate)}"
            f" (needs {_percent(dict(self.plan.gate))}); raise Plan.vae_steps"
        )

    def encode(self) -> None:
        """Encode the training scenes once; the latents' spread sets the VAE's scaling factor, as in SD."""
        from safetensors.torch import save_file

        self.vae.eval()
        means, logvars = [], []
        scenes = training_scenes(self.plan)
        with torch.no_grad():
            for start in range(0, len(scenes), 64):
                posterior = self.vae.encode(_pixels([render(s) for s in scenes[start : start + 64]])).latent_dist
                means.append(posterior.mean)
                logvars.append(posterior.logvar)
        mean, logvar = torch.cat(means), torch.cat(logvars)
        save_file({"mean": mean.contiguous(), "logvar": logvar.contiguous()}, self.work / "latents.safetensors")
        self.state.scaling_factor = float(1.0 / mean.std())
        self.state.phase, self.state.step, self.state.losses = "unet", 0, []

    def unet_step(self, latents: dict[str, torch.Tensor], scenes: list[Scene]) -> None:
        plan, step = self.plan, self.state.step
        rng = _rng(plan, "unet", step)
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


def write_model_card(folder: Path) -> None:
    """README.md of a pretrained toy model, from its scores.json: what it is, how it was made, what it scores.

    Written again over an existing card (a new template, no retraining), it keeps what a person added under NOTES."""
    scores = json.loads((folder / "scores.json").read_text())
    plan = scores["plan"]
    old = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    vae = (
        f"The VAE is {plan['vae_from']}'s, checked against the gate"
        if plan.get("vae_from")
        else f"The VAE trained {plan['vae_batch']} images per step (AdamW, LR {plan['vae_lr']}, cosine decay from step"
        f" {plan['vae_anneal_from']}) until its gate passed (at most {plan['vae_steps']} steps)"
    )
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["boothflow", "toy-sd", "stable-diffusion", "text-to-image"],
        widget=[{"text": caption} for caption in EXAMPLE_CAPTIONS],
    )
    card = ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        quick=plan["name"] == "quick",
        plan=plan,
        vae=vae,
        cpu=f"{scores['cpu_seconds'] / 60:.0f} CPU minutes ({scores['wall_seconds'] / 60:.0f} minutes wall",
        gate=", ".join(f"{name} {100 * value:.1f}%" for name, value in scores["vae_gate"].items()),
        floors=", ".join(f"{name} >= {100 * value:.0f}%" for name, value in plan["gate"]),
        fidelity=", ".join(f"{name} {100 * value:.1f}%" for name, value in scores["caption_fidelity"].items()),
        final_loss=scores["final_loss"],
        notes=old[old.find(NOTES) :].strip() if NOTES in old else "",
    )
    card.save(folder / "README.md")


def _cosine(step: int, total: int, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + float(np.cos(np.pi * min(step, total) / total)))


def _percent(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {100 * value:.0f}%" for name, value in scores.items())


def fidelity_prompts() -> list[str]:
    """One full caption per (shape, colour, background) combination: 4 x 6 x 5 = 120 prompts."""
    return [
        f"a photo of a {colour} {shape} on a {background} background"
        for shape in SHAPES
        for colour in PALETTE
        for background in PALETTE
        if background != colour
    ]


def caption_fidelity(model: Path, plan: Plan) -> dict[str, float]:
    """Render every fidelity prompt once (seed = its index) and score what the analyser reads against it."""
    from diffusers import StableDiffusionPipeline

    from tasks.sd.render import RenderRequest, make_scheduler, render

    pipe = StableDiffusionPipeline.from_pretrained(model)
    make_scheduler(pipe, "DPMSolverMultistepScheduler")
    requests = [
        RenderRequest(prompt, "", seed, plan.eval_steps, plan.eval_guidance, 64, 64)
        for seed, prompt in enumerate(fidelity_prompts())
    ]
    checks = [matches(read(image), parse(r.prompt)) for r, image in render(pipe, requests, 40, "caption fidelity")]
    return {name: float(np.mean([c[name] for c in checks])) for name in ("colour", "background", "shape", "all")}


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
