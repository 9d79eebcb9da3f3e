"""What the train stage hands its training child: one JSON file, read by `tasks.training` under accelerate."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from tasks.core.config import TrainSection


class TrainJob(BaseModel):
    """Everything the child needs, written by the train stage; paths here never reach a cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: str
    base: Path
    latents_dir: Path
    out_dir: Path
    checkpoints_dir: Path
    train: TrainSection
    optimizer: str
    instance_prompt: str
    class_prompt: str | None
    captions: dict[str, str] = {}  # instance sample id -> its own training prompt (sidecar captions)
    prior_weight: float
    text_embeds: dict[str, Path] | None  # prompt -> its cached embeddings, when the text encoders are frozen
    parent_pid: int
    facts: dict[str, Any]

    def prompts(self) -> list[str]:
        """Every prompt a batch can hold: the instance prompt, the captions, the class prompt."""
        found = [self.instance_prompt, *self.captions.values(), self.class_prompt]
        return list(dict.fromkeys(p for p in found if p is not None))


def resolved_optimizer(cfg: TrainSection) -> str:
    """8-bit Adam only where it can run (CUDA + bitsandbytes); otherwise AdamW, and the key says AdamW."""
    if cfg.optimizer == "adamw8bit" and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        return "adamw8bit"
    return "adamw"


def keyed_settings(cfg: TrainSection) -> dict[str, Any]:
    """The train section as its key holds it: what runs on this machine. The optimizer as resolved, and TF32 only with
    CUDA, since without CUDA it cannot change a number."""
    without = () if torch.cuda.is_available() else ("tf32",)
    return {**cfg.keyed(without), "optimizer": resolved_optimizer(cfg)}
