"""How a pretrained toy model is judged, by the analyser: its VAE's reconstructions of held-out scenes against the
gate, and the finished model's fidelity to every caption the world can say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.toy.plan import Plan
from tasks.toy.score import Reading, matches, parse, read
from tasks.toy.world import PALETTE, SHAPES, Scene, render, scene, subject_scene


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_images(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def held_out(plan: Plan) -> tuple[list[Scene], list[Scene]]:
    rng = plan.rng("held-out")
    return [scene(rng) for _ in range(plan.gate_images)], [subject_scene(rng) for _ in range(plan.gate_images)]


def score_readings(readings: list[Reading], scenes: list[Scene]) -> dict[str, float]:
    """Share of images whose colour, background and shape the analyser reads as the scene has them."""
    shown = [r.shows(s) for r, s in zip(readings, scenes, strict=True)]
    return {name: float(np.mean([s[name] for s in shown])) for name in ("colour", "background", "shape")}


def vae_gate(vae: torch.nn.Module, plan: Plan) -> dict[str, float]:
    """The analyser's scores on reconstructions of held-out scenes, and the share of subjects that survive."""
    plain, subjects = held_out(plan)
    readings: dict[str, list[Reading]] = {"plain": [], "subject": []}
    vae.eval()
    with torch.no_grad():
        for name, scenes in (("plain", plain), ("subject", subjects)):
            for start in range(0, len(scenes), 32):
                batch = to_pixels([render(s) for s in scenes[start : start + 32]])
                readings[name] += [read(i) for i in _to_images(vae(batch, sample_posterior=False).sample)]
    vae.train()
    return score_readings(readings["plain"], plain) | {
        "subject": float(np.mean([r.subject for r in readings["subject"]]))
    }


def passes(scores: dict[str, float], plan: Plan) -> bool:
    return all(scores[name] >= floor for name, floor in plan.gate)


def percent(scores: dict[str, float]) -> str:
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
