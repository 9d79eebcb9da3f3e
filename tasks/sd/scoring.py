"""Subject and prompt fidelity scores of the DreamBooth paper: CLIP and DINO embeddings and their mean cosines.

The scoring models are optional: a model that is not set or not on disk is a message for the page, not an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tasks.core.batching import batched
from tasks.core.hash_memo import HashMemo
from tasks.core.progress import track
from tasks.sd.device import loaded
from tasks.sd.models import cached_folder, component_identity

EMBED_BATCH = 16


@dataclass(frozen=True)
class MetricModel:
    """One of the two scoring models: its setting, what it scores, and a known-good example id."""

    name: str
    setting: str
    scores: str
    example: str


CLIP = MetricModel("clip", "evaluate.clip_model", "CLIP-T and CLIP-I", "openai/clip-vit-large-patch14")
DINO = MetricModel("dino", "evaluate.dino_model", "DINO", "facebook/dino-vits16")


def model_identity(model_id: str, root: Path | None = None) -> str | None:
    """A location-free identity of a metric model for the key; getting the model later changes it. A folder's files
    are hashed only when they changed since a run with the artifact root `root` last hashed them."""
    if not model_id:
        return None
    path = cached_folder(model_id)
    if path is None:
        return f"unavailable:{model_id}"
    with HashMemo(root) as memo:
        return component_identity(path, "", memo.sha256)


def token_pattern(token: str) -> re.Pattern[str]:
    """The identifier as a word of a prompt (`sks,` included, `asks` not)."""
    return re.compile(rf"(?<!\w){re.escape(token)}(?!\w)")


def clip_text(prompt: str, token: str) -> str:
    """The text CLIP-T compares an image with: its prompt without the identifier token, which CLIP never saw."""
    if token:
        prompt = token_pattern(token).sub(" ", prompt)
    return " ".join(prompt.split())


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns an output whose pooler_output is the projected embedding; 4.x the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class MetricsUnavailable(Exception):
    """A metric model that is not set, not found or not loadable; str() tells the user how to set it."""


def load_metric_model(model: MetricModel, model_id: str, device: torch.device) -> tuple[Any, Any]:
    """(network, processor) for CLIP (CLIPModel, CLIPProcessor) or DINO (AutoModel, AutoImageProcessor)."""
    how = f"set {model.setting} to a hub id or folder, e.g. --set {model.setting}={model.example}"
    if not model_id:
        raise MetricsUnavailable(f"{model.scores}: no model; {how}")
    path = cached_folder(model_id)
    if path is None:
        raise MetricsUnavailable(
            f"{model.scores}: {model.setting} = {model_id!r} is neither a folder nor in the local Hugging Face "
            f"cache; download it once (hf download {model_id}) or {how}"
        )
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    try:
        if model is CLIP:
            return loaded(CLIPModel.from_pretrained(path).eval().to(device)), CLIPProcessor.from_pretrained(path)
        return loaded(AutoModel.from_pretrained(path).eval().to(device)), AutoImageProcessor.from_pretrained(path)
    except Exception as err:
        line = (str(err).splitlines() or [""])[0][:200]
        raise MetricsUnavailable(
            f"{model.scores}: {model.setting} = {model_id!r} cannot be loaded ({type(err).__name__}: {line}); {how}"
        ) from err


@torch.inference_mode()
def image_embeddings(
    model: MetricModel, network: Any, processor: Any, paths: Sequence[Path], device: torch.device
) -> dict[Path, torch.Tensor]:
    """Unit-length embedding of each image: CLIP's projected image embedding, or a DINO ViT's CLS token."""
    found: dict[Path, torch.Tensor] = {}
    batches = batched(list(dict.fromkeys(paths)), EMBED_BATCH)
    for batch in track(batches, len(batches), f"evaluate: {model.name} image embeddings"):
        pixels = processor(images=[open_rgb(p) for p in batch], return_tensors="pt")["pixel_values"].to(device)
        if model is CLIP:
            vectors = _features(network.get_image_features(pixel_values=pixels))
        else:
            vectors = network(pixel_values=pixels).last_hidden_state[:, 0]
        found.update(zip(batch, torch.nn.functional.normalize(vectors.float(), dim=-1).cpu(), strict=True))
    return found


@torch.inference_mode()
def text_embeddings(
    network: Any, processor: Any, texts: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Unit-length CLIP text embedding of each text (truncated to CLIP's 77 tokens)."""
    found: dict[str, torch.Tensor] = {}
    for batch in batched(list(dict.fromkeys(texts)), EMBED_BATCH):
        tokens = processor(text=list(batch), padding=True, truncation=True, return_tensors="pt").to(device)
        vectors = _features(network.get_text_features(**tokens))
        found.update(zip(batch, torch.nn.functional.normalize(vectors.float(), dim=-1).cpu(), strict=True))
    return found


def mean_cosine(left: list[torch.Tensor], right: list[torch.Tensor], skip_same: bool = False) -> float | None:
    """Mean cosine over every (left, right) pair of unit vectors; `skip_same` leaves out each vector with itself."""
    if not left or not right or (skip_same and len(left) < 2):
        return None
    scores = torch.stack(left) @ torch.stack(right).T
    return float(scores[~torch.eye(len(left), dtype=torch.bool)].mean() if skip_same else scores.mean())
