"""Tiny random CLIP and DINO ViT folders for the report's metrics, built offline in about a second.

Their scores mean nothing; they let the report load and score with the real transformers classes on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

SIDE = 32  # input pixels of both tiny vision towers: 4x4 patches of 8 px
TINY_VISION = {
    "image_size": SIDE,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def build_clip(folder: Path, tokenizer_dir: Path) -> Path:
    """A CLIPModel + CLIPProcessor folder; `tokenizer_dir` is a CLIP tokenizer (the tiny-sd15 preset's)."""
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16))
    model.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_dino(folder: Path) -> Path:
    """A ViTModel + ViTImageProcessor folder, the architecture of facebook/dino-vits16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = ViTModel(ViTConfig(**TINY_VISION))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    return folder
