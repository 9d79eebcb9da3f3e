"""The real SD 1.5 and SDXL component configs, written here so full-size shapes exist without any download.

They build the `sd15-arch` / `sdxl-arch` presets (random weights) and let the memory plan size a hub model
that is not on disk yet; values as in the configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0.
"""

from __future__ import annotations

from typing import Any

CLIP_VOCAB = 49408  # CLIP's BPE vocabulary: the token embedding tables have this many rows

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE: dict[str, Any] = SD15_VAE | {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "act_fn": "silu",
}

# CLIP ViT-L/14's text tower (SD 1.5, and SDXL's first encoder) and OpenCLIP ViT-bigG/14's (SDXL's second).
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG_TEXT: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# Per family: each component's config by its folder name in a diffusers pipeline.
COMPONENT_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": CLIP_L_TEXT},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L_TEXT, "text_encoder_2": CLIP_BIGG_TEXT},
}

# Hub ids whose architecture is one of the above, so a plan can size them before they are downloaded.
KNOWN_HUB_FAMILIES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}
