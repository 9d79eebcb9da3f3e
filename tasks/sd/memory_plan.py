"""The memory plan of a config: its stages' estimates against the device's memory, before the first stage runs.

A config that cannot fit stops the run with one line that names the settings that would fit; one that nearly fills
the device gets a warning.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from tasks.core.config import RunConfig
from tasks.core.values import parse_memory
from tasks.sd.memory import (
    WARN_MARGIN,
    Architecture,
    Estimate,
    MemoryPlanError,
    architecture,
    cuda_memory,
    estimate_render,
    estimate_train,
    gib,
)


def estimate(config: RunConfig, arch: Architecture, stage: str) -> Estimate:
    """The plan of one stage that loads a large model on the accelerator: train, generate or class_images."""
    resolution, gen, prior = config.preprocess.resolution, config.generate, config.prior
    if stage == "train":
        return estimate_train(arch, config.train, resolution, prior.enabled)
    if stage == "generate":
        return estimate_render(arch, stage, gen.dtype, gen.batch_size, gen.size or resolution, gen.guidance,
                               gen.vae_slicing, gen.vae_tiling)  # fmt: skip
    return estimate_render(arch, stage, prior.dtype, prior.batch_size, resolution, prior.guidance, prior.vae_slicing,
                           tiling=False)  # fmt: skip


def estimates(config: RunConfig, arch: Architecture) -> list[Estimate]:
    """The plan of every stage of this config that loads a large model on the accelerator."""
    stages = ["train", "generate", *(["class_images"] if config.prior.enabled else [])]
    return [estimate(config, arch, stage) for stage in stages]


# Settings tried, one more at a time, when a stage does not fit: the cheapest change first.
REMEDIES: dict[str, list[tuple[str, str, Any]]] = {
    "train": [
        ("train", "gradient_checkpointing", True),
        ("train", "mixed_precision", "bf16"),
        ("train", "optimizer", "adamw8bit"),
        ("train", "batch_size", 1),
    ],
    "generate": [
        ("generate", "vae_slicing", True),
        ("generate", "dtype", "bfloat16"),
        ("generate", "batch_size", 1),
        ("generate", "vae_tiling", True),
    ],
    "class_images": [("prior", "vae_slicing", True), ("prior", "dtype", "bfloat16"), ("prior", "batch_size", 1)],
}


def _with(config: RunConfig, section: str, name: str, value: Any) -> RunConfig:
    part = getattr(config, section).model_copy(update={name: value})
    return config.model_copy(update={section: part})


def _remedy(config: RunConfig, arch: Architecture, stage: str, memory: int) -> str:
    """The fewest of REMEDIES (taken in order) that make `stage` fit, as --set options; else what it needs at best."""
    changes: list[str] = []
    best = None
    for section, name, value in REMEDIES[stage]:
        if getattr(getattr(config, section), name) == value:
            continue
        config = _with(config, section, name, value)
        changes.append(f"--set {section}.{name}={json.dumps(value)}")
        best = estimate(config, arch, stage)
        if best.total <= memory:
            return f"settings that would fit: {' '.join(changes)} (~{gib(best.total)})"
    if best is None:
        return "every memory saver is already on; use a device with more memory"
    return f"even with {' '.join(changes)} it needs ~{gib(best.total)}; use a device with more memory"


def check_precision(config: RunConfig) -> None:
    """fp16 needs CUDA: CPUs have no fp16 autocast, and a module cast to fp16 fails on float32 inputs."""
    if torch.cuda.is_available():
        return
    wanted = {
        "train.mixed_precision": config.train.mixed_precision == "fp16",
        "generate.dtype": config.generate.dtype == "float16",
        "prior.dtype": config.prior.enabled and config.prior.dtype == "float16",
        "latents.dtype": config.latents.dtype == "float16",
    }
    for setting, fp16 in wanted.items():
        if fp16:
            value = "bf16" if setting == "train.mixed_precision" else "bfloat16"
            raise MemoryPlanError(
                f"{setting} asks for fp16, which needs a CUDA GPU and none is visible; "
                f"use --set {setting}={value} (bf16 runs on CPUs) or float32"
            )


def device_memory(config: RunConfig) -> int | None:
    """The memory to plan for: `run.device_memory` when set, else the CUDA device's; None: nothing to check."""
    return parse_memory(config.run.device_memory) if config.run.device_memory else cuda_memory()


def preflight(config: RunConfig) -> list[str]:
    """Checks made before the first stage: a precision the device can run, and a plan that fits its memory.
    Returns the warnings; raises MemoryPlanError (one line) for a config that cannot run."""
    check_precision(config)
    memory = device_memory(config)
    return check_memory(config, memory) if memory else []


def check_memory(config: RunConfig, memory: int) -> list[str]:
    """Stop when a stage cannot fit `memory` bytes (MemoryPlanError, one line); the warnings for stages within
    WARN_MARGIN of it. Unknown architectures (a hub id not downloaded yet) are not checked: that is one warning."""
    arch = architecture(config.model.id, config.run.artifacts_root, config.model.revision)
    if arch is None:
        return [f"memory plan: the architecture of {config.model.id!r} is unknown until it is downloaded; not checked"]
    return verdict(config, arch, estimates(config, arch), memory)


def verdict(config: RunConfig, arch: Architecture, found: list[Estimate], memory: int) -> list[str]:
    """Judge estimates already made against `memory`: MemoryPlanError for the first stage that does not fit,
    else the warnings for stages within WARN_MARGIN of it."""
    warnings = []
    for planned in found:
        if planned.total > memory:
            raise MemoryPlanError(
                f"memory plan: {planned.describe()} but the device has {gib(memory)}; "
                f"{_remedy(config, arch, planned.stage, memory)}"
            )
        if planned.total > (1 - WARN_MARGIN) * memory:
            warnings.append(f"memory plan: {planned.describe()}, within 10% of the device's {gib(memory)}")
    return warnings
