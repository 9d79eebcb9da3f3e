"""The LDM layout of SD 1.5 weights: the single-file checkpoint that A1111 and ComfyUI load (and diffusers'
`from_single_file`), written from diffusers modules by the inverse of diffusers' own conversion."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

# Prefixes of the original LDM checkpoint, as A1111 and ComfyUI (and diffusers' from_single_file) read it.
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_TEXT_ENCODER = "cond_stage_model.transformer."

# diffusers module -> LDM module: the inverse of diffusers' conversion (diffusers/loaders/single_file_utils.py:
# DIFFUSERS_TO_LDM_MAPPING, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint).
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_module(module: str, per_block: int, up_blocks_with_attention: set[int]) -> str:
    """LDM numbers every resnet (+ its attention) and every resampler as one input/output block, in order:
    down block b has per_block layers and a downsampler, up block b has per_block + 1 layers, the last of which
    also holds the upsampler (after its attention, if any); the middle block alternates resnet, attention."""

    def down(b: str, j: int | str) -> int:
        return 1 + int(b) * (per_block + 1) + int(j)

    def up(b: str, j: int | str) -> int:
        return int(b) * (per_block + 1) + int(j)

    match module.split("."):
        case ["down_blocks", b, "resnets", j, *inner]:
            return f"input_blocks.{down(b, j)}.0.{UNET_RESNET['.'.join(inner)]}"
        case ["down_blocks", b, "attentions", j, *inner]:
            return ".".join([f"input_blocks.{down(b, j)}.1", *inner])
        case ["down_blocks", b, "downsamplers", "0", "conv"]:
            return f"input_blocks.{down(b, per_block)}.0.op"
        case ["mid_block", "resnets", j, *inner]:
            return f"middle_block.{2 * int(j)}.{UNET_RESNET['.'.join(inner)]}"
        case ["mid_block", "attentions", j, *inner]:
            return ".".join([f"middle_block.{2 * int(j) + 1}", *inner])
        case ["up_blocks", b, "resnets", j, *inner]:
            return f"output_blocks.{up(b, j)}.0.{UNET_RESNET['.'.join(inner)]}"
        case ["up_blocks", b, "attentions", j, *inner]:
            return ".".join([f"output_blocks.{up(b, j)}.1", *inner])
        case ["up_blocks", b, "upsamplers", "0", "conv"]:
            slot = 2 if int(b) in up_blocks_with_attention else 1
            return f"output_blocks.{up(b, per_block)}.{slot}.conv"
    return UNET_TOP[module]


def _vae_module(module: str, up_blocks: int) -> str:
    """LDM's decoder numbers its up blocks from the bottom (diffusers' up block i is LDM's up.{n-1-i})."""
    match module.split("."):
        case ["encoder", "down_blocks", i, "resnets", j, *inner]:
            return f"encoder.down.{i}.block.{j}.{VAE_RESNET['.'.join(inner)]}"
        case ["encoder", "down_blocks", i, "downsamplers", "0", "conv"]:
            return f"encoder.down.{i}.downsample.conv"
        case ["decoder", "up_blocks", i, "resnets", j, *inner]:
            return f"decoder.up.{up_blocks - 1 - int(i)}.block.{j}.{VAE_RESNET['.'.join(inner)]}"
        case ["decoder", "up_blocks", i, "upsamplers", "0", "conv"]:
            return f"decoder.up.{up_blocks - 1 - int(i)}.upsample.conv"
        case [coder, "mid_block", "resnets", j, *inner]:
            return f"{coder}.mid.block_{int(j) + 1}.{VAE_RESNET['.'.join(inner)]}"
        case [coder, "mid_block", "attentions", "0", *inner]:
            return f"{coder}.mid.attn_1.{VAE_ATTENTION['.'.join(inner)]}"
    return VAE_TOP[module]


def _text_encoder_module(module: str) -> str:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the LDM layout keeps the prefix."""
    return "text_model." + module.removeprefix("text_model.")


def _renamed(state: dict[str, torch.Tensor], prefix: str, rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Every tensor under its LDM name (prefix + renamed module + same parameter name); unknown modules fail loudly
    rather than being dropped, so a checkpoint that A1111 would load half-initialised is never written."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, parameter = key.rsplit(".", 1)
        try:
            name = f"{prefix}{rename(module)}.{parameter}"
        except KeyError as error:
            raise ValueError(f"no LDM name for {key!r} (unknown module {error})") from None
        if name in renamed:
            raise ValueError(f"two tensors map to the LDM name {name!r}")
        renamed[name] = tensor.contiguous()
    return renamed


def ldm_unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet in the LDM layout, generic in the number of blocks and layers per block."""
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError(f"the LDM layout needs one layers_per_block for all blocks, not {per_block!r}")
    state = unet.state_dict()
    with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    return _renamed(
        state, LDM_UNET, partial(_unet_module, per_block=per_block, up_blocks_with_attention=with_attention)
    )


def ldm_vae_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE in the LDM layout; its mid-block attention uses 1x1 convolutions where diffusers has Linear layers."""
    state = {
        key: tensor[:, :, None, None] if ".mid_block.attentions." in key and tensor.ndim == 2 else tensor
        for key, tensor in vae.state_dict().items()
    }
    return _renamed(state, LDM_VAE, partial(_vae_module, up_blocks=len(vae.config.up_block_types)))


def ldm_text_encoder_state(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    return _renamed(text_encoder.state_dict(), LDM_TEXT_ENCODER, _text_encoder_module)
