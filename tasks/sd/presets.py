"""Model presets: SD 1.5 and SDXL architectures with random weights, built offline on first use, and pretrained
presets that ship with the project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from filelock import FileLock

from tasks.core.atomic import atomic_folder, clear_partials
from tasks.core.shipped import shipped_root
from tasks.sd import text
from tasks.sd.architectures import COMPONENT_CONFIGS
from tasks.sd.tokenizer import tiny_tokenizer

if TYPE_CHECKING:  # diffusers and transformers load inside the builders: listing presets needs neither
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer

T = TypeVar("T")

# Small channel counts, but the real block layout: GroupNorm always sees >= 4 channels per group.
TINY_VAE = {
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,  # 4 blocks, 3 downsamples: 64 px -> 8x8 latent
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 2,
    "sample_size": 64,
}
TINY_TEXT_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
TINY_SD15_UNET = {
    "sample_size": 8,  # default resolution 8 * 8 = 64 px, as 64 * 8 = 512 px for SD 1.5
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TINY_TEXT_ENCODER["hidden_size"],
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
SDXL_TIME_EMBED_DIM = 8  # each of the 6 size/crop ids (original h, w, crop top, left, target h, w)
TINY_SDXL_UNET = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 8,
    # Cross-attention sees both encoders' hidden states side by side (text_encoder + text_encoder_2);
    # the added embedding sees the 6 embedded size/crop ids and text_encoder_2's pooled projection.
    "cross_attention_dim": 2 * TINY_TEXT_ENCODER["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + TINY_TEXT_ENCODER["projection_dim"],
}
# The real schedulers of SD 1.5 (stable-diffusion-v1-5) and SDXL (stable-diffusion-xl-base-1.0).
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Preset:
    """What `resolve_model` builds for a preset name: a builder that saves into a folder, and its family."""

    build: Callable[[Path], DiffusionPipeline | None]
    family: str
    description: str


def seeded(factory: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Construct one component from seed 0 without disturbing the caller's global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory(*args, **kwargs)


def text_config(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPTextConfig:
    """A tiny CLIP text config whose vocab and special ids match `tokenizer`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **(TINY_TEXT_ENCODER | overrides),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_tiny_sd15(folder: Path) -> StableDiffusionPipeline:
    """Save a tiny StableDiffusionPipeline into `folder`; return it, so tests can compare it with its reload."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=seeded(AutoencoderKL, **TINY_VAE, scaling_factor=0.18215),
        text_encoder=seeded(CLIPTextModel, text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=seeded(UNet2DConditionModel, **TINY_SD15_UNET),
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def _build_tiny_sdxl(folder: Path) -> StableDiffusionXLPipeline:
    """Save a tiny StableDiffusionXLPipeline into `folder`; return it, so tests can compare it with its reload."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer(folder / "tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=seeded(AutoencoderKL, **TINY_VAE, scaling_factor=0.13025),
        text_encoder=seeded(CLIPTextModel, text_config(tokenizer)),
        text_encoder_2=seeded(CLIPTextModelWithProjection, text_config(tokenizer, hidden_act="gelu")),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(folder / "tokenizer_2"),
        unet=seeded(UNet2DConditionModel, **TINY_SDXL_UNET),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


# The pipeline class, extra constructor arguments and scheduler of each family's full-size preset.
ARCH_PIPELINES = {
    "sd15": ("StableDiffusionPipeline", {"safety_checker": None, "feature_extractor": None,
                                         "requires_safety_checker": False}, "PNDMScheduler", SD15_SCHEDULER),
    "sdxl": ("StableDiffusionXLPipeline", {"add_watermarker": False}, "EulerDiscreteScheduler", SDXL_SCHEDULER),
}  # fmt: skip


def _build_arch(family: str) -> Callable[[Path], None]:
    """A builder of the full-size `family` architecture with random weights (seed 0 per component), saved one
    component at a time in 2 GB shards, so its peak memory is one component (SDXL's UNet: 10 GB), not the pipeline."""

    def build(folder: Path) -> None:
        import diffusers
        import transformers
        from accelerate import init_empty_weights

        pipeline_name, extra, scheduler_name, scheduler_config = ARCH_PIPELINES[family]
        configs = COMPONENT_CONFIGS[family]
        makers: dict[str, Callable[[], Any]] = {
            "unet": partial(diffusers.UNet2DConditionModel, **configs["unet"]),
            "vae": partial(diffusers.AutoencoderKL, **configs["vae"]),
        }
        tokenizers = {}
        for tokenizer_name, encoder_name in text.COMPONENTS[family]:
            tokenizer = tokenizers[tokenizer_name] = tiny_tokenizer(folder / tokenizer_name)
            tokenizer.save_pretrained(folder / tokenizer_name)  # its config: the 77-token length
            config = transformers.CLIPTextConfig(
                **configs[encoder_name],
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            makers[encoder_name] = partial(getattr(transformers, text.ENCODER_CLASSES[encoder_name]), config)
        scheduler = getattr(diffusers, scheduler_name)(**scheduler_config)
        with init_empty_weights():  # the pipeline's model_index.json, without allocating any weights
            skeleton = getattr(diffusers, pipeline_name)(
                **{name: make() for name, make in makers.items()}, **tokenizers, scheduler=scheduler, **extra
            )
        skeleton.save_config(folder)
        scheduler.save_pretrained(folder / "scheduler")
        for name, make in makers.items():
            seeded(make).save_pretrained(folder / name, safe_serialization=True, max_shard_size="2GB")

    return build


ARCH_PRESETS = {"sd15-arch": "sd15", "sdxl-arch": "sdxl"}
PRESETS: dict[str, Preset] = {
    "tiny-sd15": Preset(_build_tiny_sd15, "sd15", "SD 1.5 architecture, tiny random weights (CPU tests)"),
    "tiny-sdxl": Preset(_build_tiny_sdxl, "sdxl", "SDXL architecture, tiny random weights (CPU tests)"),
    **{
        name: Preset(_build_arch(family), family, f"{family} at full size, random weights (memory, speed, exports)")
        for name, family in ARCH_PRESETS.items()
    },
}


# Pretrained presets that ship with the project as diffusers folders: loaded from there, never built.
SHIPPED_FOLDER = shipped_root() / "data" / "models"


@dataclass(frozen=True)
class Shipped:
    """A pretrained preset that ships with the project as a diffusers folder in `SHIPPED_FOLDER`."""

    family: str
    description: str


SHIPPED = {"toy-sd": Shipped("sd15", "SD 1.5 architecture pretrained on the toy world (shipped)")}


def preset_folder(name: str, root: Path) -> Path:
    """Where a preset's diffusers folder is: in the project for a shipped one, under `root` for a built one."""
    return SHIPPED_FOLDER / name if name in SHIPPED else root / "models" / name


def build_preset(name: str, root: Path) -> Path:
    """Build a preset once per root: into a partial folder, renamed into place when complete, under a lock."""
    target = preset_folder(name, root)
    if target.is_dir():
        return target
    lock = root / ".locks" / "store" / f"models-{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        if target.is_dir():  # another process built it while we waited
            return target
        clear_partials(target)  # left by a killed build; we hold the lock
        with atomic_folder(target) as partial:
            PRESETS[name].build(partial)
    return target


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models(root: Path) -> list[dict[str, Any]]:
    """One row per preset for `boothflow models ls`: what it is, whether it is built under `root`, where."""
    rows = []
    for name, preset in (PRESETS | SHIPPED).items():
        folder = preset_folder(name, root)
        built = folder.is_dir()
        rows.append(
            {
                "name": name,
                "family": preset.family,
                "description": preset.description,
                "built": built,
                "path": str(folder),
                "size_bytes": _folder_size(folder) if built else 0,
            }
        )
    return rows
