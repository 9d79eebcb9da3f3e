"""How a toy-sd pretraining runs: its plan (how long each phase trains, its seeds, its gate) and its state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from tasks.core.seeds import derive_seed

GATE = {"colour": 0.95, "background": 0.99, "shape": 0.90, "subject": 0.90}


@dataclass(frozen=True)
class Plan:
    """How long each phase trains; `FULL` makes the shipped model, `QUICK` a rough one in about a minute."""

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
    threads: int | None = None  # torch threads; unset: OMP_NUM_THREADS where set, else 2 (the shipped model's)

    def rng(self, *parts: Any) -> random.Random:
        """The generator of one draw site, e.g. ("vae", step): the same in every chunk of a run."""
        return random.Random(derive_seed(self.seed, *parts))


FULL = Plan()
# Quick: a rough model in about a minute, for tests and a first look. Training a VAE to its gate takes most of an
# hour on a CPU, so it starts from the shipped toy-sd's VAE (checked against the gate) and trains the UNet briefly.
QUICK = replace(
    FULL,
    name="quick",
    vae_from="toy-sd",  # the gate's held-out scenes are the full plan's, so it passes as it did there
    scenes=2048,
    unet_steps=100,
    unet_batch=16,
    warmup=20,
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
