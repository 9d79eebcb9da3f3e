"""The toy-sd architecture: Stable Diffusion 1.5's classes at a size that pretrains on the toy world on CPU.

64 px images, a 4x VAE (16 x 16 x 4 latents: an 8x8 latent loses the shapes), a UNet that attends to the prompt at
8 x 8 and 4 x 4, a two-layer CLIP text encoder whose tokenizer knows the toy words, and DDPM's linear betas, which
noise a 16 x 16 latent all the way (SD's scaled-linear schedule leaves its mean colour readable at the last step,
so a model trained on it ignores colour words). About 2.5 M parameters (UNet 1.7 M, VAE 0.7 M, text encoder
0.1 M), 10 MB as float32 safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.atomic import atomic_folder
from tasks.sd.presets import seeded, text_config
from tasks.sd.tokenizer import tiny_tokenizer
from tasks.toy.world import VOCABULARY

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

MAX_TOKENS = 16  # the longest toy prompt is 11 tokens with its start and end tokens

TOY_VAE = {
    "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,  # 2 downsamples: 64 px -> 16 x 16 latent
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,  # 4 channels per group at the widest: flat colours need more than 1
    "sample_size": 64,
}
TOY_TEXT_ENCODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "projection_dim": 64,
}
TOY_UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TOY_TEXT_ENCODER["hidden_size"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TOY_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def toy_tokenizer(folder: Path) -> CLIPTokenizer:
    """The toy tokenizer, written into `folder` whole or not at all (a killed write leaves nothing to trust)."""
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        with atomic_folder(folder) as partial:
            tiny_tokenizer(partial, VOCABULARY, MAX_TOKENS).save_pretrained(partial)  # with its max length
    return CLIPTokenizer.from_pretrained(folder)


def toy_components(tokenizer: CLIPTokenizer) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """VAE, UNet and text encoder with seeded random weights: where pretraining starts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (
        seeded(AutoencoderKL, **TOY_VAE),
        seeded(UNet2DConditionModel, **TOY_UNET),
        seeded(CLIPTextModel, text_config(tokenizer, **TOY_TEXT_ENCODER)),
    )


def toy_pipeline(
    vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline:
    """The components as an SD 1.5 pipeline with the toy scheduler, ready for `save_pretrained`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**TOY_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
