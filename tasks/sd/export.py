"""Training outputs: the sd15 diffusers folder and A1111 single file, the sdxl LoRA files, and the model card.

Each file is in the layout its consumer loads (diffusers, A1111/ComfyUI, kohya), so a run's result is usable as is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel

from tasks.sd.layout import KOHYA_FILE, LORA_FILE, SINGLE_FILE

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


def _has_safety_checker(base: Path) -> bool:
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    return (index.get("safety_checker") or [None])[0] is not None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _tensor_count(path: Path) -> int:
    with safe_open(path, framework="pt") as file:
        return len(file.keys())


def save_sd15_outputs(
    base: Path,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    out: Path,
    safety_checker: bool = False,
    vae_path: Path | None = None,
    base_id: str | None = None,
) -> dict[str, Any]:
    """Write the base pipeline with the trained unet and text encoder into `out` as the hub lays out a diffusers
    repository (model_index.json and a folder per component), and beside it `model.safetensors`: the same weights in
    the LDM layout that A1111 and ComfyUI load. The base's safety checker is kept only when asked for, so the choice
    is explicit and lands in the model card. A separate VAE (the one training latents came from) replaces the base's.
    Paths in the facts are relative to `out`. The configs name the base as `base_id` (default: its folder's name),
    never by the folder it was loaded from on this machine."""
    base_has_checker = _has_safety_checker(base)
    options: dict[str, Any] = {}
    if base_has_checker and not safety_checker:
        options.update(safety_checker=None, requires_safety_checker=False)
    if vae_path is not None and vae_path != base / "vae":
        options.update(vae=AutoencoderKL.from_pretrained(vae_path))
    pipe = StableDiffusionPipeline.from_pretrained(base, unet=unet, text_encoder=text_encoder, **options)
    for part in (pipe, *pipe.components.values()):
        if isinstance(part, ConfigMixin):
            part.register_to_config(_name_or_path=base_id or base.name)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)

    parts = {
        "unet": ldm_unet_state(pipe.unet),
        "vae": ldm_vae_state(pipe.vae),
        "text_encoder": ldm_text_encoder_state(pipe.text_encoder),
    }
    save_file({k: v for part in parts.values() for k, v in part.items()}, out / SINGLE_FILE, metadata={"format": "pt"})
    components = [name for name in pipe.components if (out / name).is_dir()]
    return {
        "family": "sd15",
        "lora": False,
        "safety_checker": ("kept" if safety_checker else "removed") if base_has_checker else "none in base model",
        "ldm_tensors": {name: len(part) for name, part in parts.items()},
        "files": {
            **{f"{name}/": {"bytes": _size(out / name), "tensors": None} for name in components},
            SINGLE_FILE: {"bytes": _size(out / SINGLE_FILE), "tensors": _tensor_count(out / SINGLE_FILE)},
        },
    }


def _kohya_text_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kohya names text-encoder LoRA modules from `text_model.` (lora_te1_text_model_encoder_...), which
    transformers >= 5.6 dropped from CLIPTextModel's own module names."""
    renamed = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component in ("text_encoder", "text_encoder_2"):
            key = f"{component}.text_model.{rest.removeprefix('text_model.')}"
        renamed[key] = tensor
    return renamed


def save_sdxl_lora(
    unet_lora_state: dict[str, torch.Tensor],
    text_encoder_lora_state: dict[str, torch.Tensor] | None,
    text_encoder_2_lora_state: dict[str, torch.Tensor] | None,
    out: Path,
) -> dict[str, Any]:
    """Write the LoRA as diffusers' train_dreambooth_lora_sdxl.py does: `pytorch_lora_weights.safetensors` for
    `pipe.load_lora_weights`, and (its --output_kohya_format) `pytorch_lora_weights_kohya.safetensors` for A1111.
    The states come from `peft.utils.get_peft_model_state_dict(model)`; as in that script, LoRA alpha is the rank
    (neither file records another alpha)."""
    given = {
        "unet": unet_lora_state,
        "text_encoder": text_encoder_lora_state,
        "text_encoder_2": text_encoder_2_lora_state,
    }
    states = {name: state for name, state in given.items() if state}
    layers = {name: convert_state_dict_to_diffusers(state) for name, state in states.items()}
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        out,
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        text_encoder_2_lora_layers=layers.get("text_encoder_2"),
        weight_name=LORA_FILE,
        safe_serialization=True,
    )
    # Kohya from the PEFT states themselves: the script reads the diffusers file back and guesses its format, which
    # leaves the unet keys unconverted when text-encoder LoRA keys are in the same file.
    peft_state = {f"{name}.{key}": tensor for name, state in states.items() for key, tensor in state.items()}
    save_file(convert_state_dict_to_kohya(_kohya_text_encoder_keys(peft_state)), out / KOHYA_FILE)
    return {
        "family": "sdxl",
        "lora": True,
        "lora_modules": {name: sum(k.endswith(".lora_A.weight") for k in state) for name, state in states.items()},
        "files": {
            name: {"bytes": _size(out / name), "tensors": _tensor_count(out / name)} for name in (LORA_FILE, KOHYA_FILE)
        },
    }


CARD_FIELDS = ("family", "base_model", "instance_prompt", "steps", "final_loss", "settings")
FAMILY_TAGS = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl"}
CARD_TEMPLATE = resources.files(__package__) / "templates" / "model_card.md"


def _backtick_fence(text: str, shortest: int) -> str:
    """A run of backticks longer than any in `text`, so the text inside needs no escaping."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(shortest, longest + 1)


def _cell(value: Any) -> str:
    """A value as an inline code span in a table row: strings as is (only `|` escaped for the table), anything
    else, and strings with line breaks (which would end the row), as JSON."""
    plain = isinstance(value, str) and not re.search(r"[\r\n]", value)
    text = value if plain else json.dumps(value, ensure_ascii=False, default=str)
    fence = _backtick_fence(text, 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    escaped = text.replace("|", "\\|")
    return f"{fence}{pad}{escaped}{pad}{fence}"


def _block(text: str, language: str) -> str:
    fence = _backtick_fence(text, 3)
    return f"{fence}{language}\n{text}\n{fence}"


def write_model_card(out: Path, facts: dict[str, Any]) -> None:
    """README.md beside the weights: the hub's metadata (through huggingface_hub's ModelCard) and a body that says
    how they were made, rendered from `templates/model_card.md`.

    `facts` needs family ("sd15"|"sdxl"), base_model, instance_prompt, steps, final_loss (float or None) and
    settings (the recipe as {name: value}); it may add base_model_repo (the hub id the metadata names, when the base
    model is one), lora, safety_checker and files (as the save functions
    return them), widget_prompts (default: the instance prompt) and license (default "other", a placeholder for the
    base model's license). User text is written verbatim: YAML-quoted in the metadata, in code blocks and spans in
    the body, never as HTML."""
    missing = [field for field in CARD_FIELDS if field not in facts]
    if missing:
        raise ValueError(f"model card facts lack {missing}")
    lora = bool(facts.get("lora", False))
    loss = facts["final_loss"]
    data = ModelCardData(
        base_model=facts.get("base_model_repo"),  # the hub rejects a card whose base model is no repository
        license=facts.get("license", "other"),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["boothflow", "dreambooth", FAMILY_TAGS[facts["family"]], *(["lora"] if lora else []), "text-to-image"],
        instance_prompt=facts["instance_prompt"],
        # Prompts only: the samples are rendered after training, by the generate stage, into its own entry.
        widget=[{"text": prompt} for prompt in facts.get("widget_prompts") or [facts["instance_prompt"]]],
    )
    settings = {
        "base model": str(facts["base_model"]),
        "instance prompt": data.instance_prompt,
        "steps": facts["steps"],
        "final loss": "n/a" if loss is None else f"{loss:.6g}",
        **({"safety checker": facts["safety_checker"]} if "safety_checker" in facts else {}),
        **facts["settings"],
    }
    card = ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        base_model=str(facts["base_model"]),
        lora=lora,
        steps=facts["steps"],
        settings=settings,
        files=facts.get("files", {}),
        cell=_cell,
        block=_block,
        single_file=SINGLE_FILE,
        lora_file=LORA_FILE,
        kohya_file=KOHYA_FILE,
    )
    card.save(out / "README.md")
