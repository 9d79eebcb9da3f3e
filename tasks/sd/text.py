"""Prompt embeddings for SD 1.5 and SDXL, computed as the diffusers DreamBooth training scripts compute them.

SD 1.5 conditions on the text encoder's last hidden state; SDXL on both encoders' penultimate hidden states
(concatenated) plus the second encoder's pooled projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers loads with the encoders: computing keys and reading caches need none of it
    from transformers import CLIPTokenizer

COMPONENTS = {
    "sd15": (("tokenizer", "text_encoder"),),
    "sdxl": (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
}
ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # the encoders' attention projections that get LoRA


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on: per-token states and, for SDXL, the pooled text embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None


def text_components(family: str) -> list[str]:
    return [name for pair in COMPONENTS[family] for name in pair]


def load_tokenizers(base: Path, family: str) -> list[CLIPTokenizer]:
    from transformers import CLIPTokenizer

    return [CLIPTokenizer.from_pretrained(base, subfolder=tok) for tok, _ in COMPONENTS[family]]


def load_text_encoders(base: Path, family: str, dtype: torch.dtype = torch.float32) -> list[torch.nn.Module]:
    import transformers

    return [
        getattr(transformers, ENCODER_CLASSES[name]).from_pretrained(base, subfolder=name, torch_dtype=dtype)
        for _, name in COMPONENTS[family]
    ]


def tokenize(tokenizers: list[CLIPTokenizer], prompt: str) -> list[torch.Tensor]:
    """Token ids padded to each tokenizer's length (77 for CLIP), shape [1, 77] per encoder."""
    return [
        tok(
            prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tok in tokenizers
    ]


def _encode_sd15(encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
    return Conditioning(encoders[0](ids[0].to(encoders[0].device), return_dict=False)[0], None)


def _encode_sdxl(encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
    states, pooled = [], None
    for encoder, token_ids in zip(encoders, ids, strict=True):
        out = encoder(token_ids.to(encoder.device), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        states.append(out[-1][-2])
    return Conditioning(torch.cat(states, dim=-1), pooled.view(pooled.shape[0], -1))


ENCODERS: dict[str, Callable[[list[torch.nn.Module], list[torch.Tensor]], Conditioning]] = {
    "sd15": _encode_sd15,
    "sdxl": _encode_sdxl,
}


def encode(family: str, encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> Conditioning:
    return ENCODERS[family](encoders, ids)
