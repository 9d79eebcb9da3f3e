"""Base models by preset name, local folder or hub id, and the tiny presets built offline on first use.

Tiny vs real is only a model id: every stage resolves its model here, so CPU tests run the real loading path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from filelock import FileLock
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from tasks.core.atomic import atomic_folder, clear_partials
from tasks.core.hash_memo import HashMemo
from tasks.core.shipped import shipped_root
from tasks.core.store import file_sha256
from tasks.sd import text
from tasks.sd.architectures import COMPONENT_CONFIGS

if TYPE_CHECKING:  # diffusers and transformers load where models are built or loaded: resolving needs neither
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer

T = TypeVar("T")

FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}

# Words the tiny tokenizer merges into single tokens; everything else falls back to byte tokens.
TOKENIZER_WORDS = ("photo", "of", "sks", "dog", "cat", "toy", "person", "in", "the")

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


class ModelUnavailable(Exception):
    """A model id that is neither a preset, a local folder, nor reachable on the hub or in its cache."""


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


def _byte_unicode_chars() -> list[str]:
    """CLIP's (GPT-2's) printable stand-ins for the 256 bytes, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How CLIP's BPE splits `word`: the lowest-ranked adjacent pair merges (everywhere), until none is left."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pair = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if tuple(symbols[i : i + 2]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _clip_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocab in CLIP's order (bytes, bytes</w>, merges, specials) and merge rules that make each
    of `words` one token (each new rule ranks after the earlier words' rules, so it never splits them)."""
    chars = _byte_unicode_chars()
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            ranks[symbols[0], symbols[1]] = len(ranks)
            if symbols[0] + symbols[1] not in tokens:
                tokens.append(symbols[0] + symbols[1])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def tiny_tokenizer(folder: Path, words: tuple[str, ...] = TOKENIZER_WORDS, max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json and merges.txt into `folder` and build CLIP's tokenizer from them, offline: each of
    `words` is one token, everything else falls back to byte tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    # transformers 5 leaves model_max_length unbounded without it, and prompts overflow the text positions.
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length
    )


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


def _preset_folder(name: str, root: Path) -> Path:
    return SHIPPED_FOLDER / name if name in SHIPPED else root / "models" / name


def _build_preset(name: str, root: Path) -> Path:
    """Build a preset once per root: into a partial folder, renamed into place when complete, under a lock."""
    target = _preset_folder(name, root)
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


def _unavailable(model_id: str, why: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"model {model_id!r} {why}; pass a local diffusers folder, set HF_HOME to a cache that has it,"
        f" or use a preset such as {' or '.join(PRESETS)}"
    )


def _first_line(error: Exception, limit: int = 200) -> str:
    line = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def _hub_snapshot(model_id: str, download: Callable[[str, bool], str], what: str) -> Path:
    """The cached snapshot of a hub repo, looked up with the file patterns its download uses (a cache filled by a
    pipeline download lacks the repo's other files, so a plain snapshot lookup would call it incomplete); the
    download runs only when the cache does not have it."""
    try:
        validate_repo_id(model_id)
    except HFValidationError as error:
        raise _unavailable(model_id, f"is not {what} or a valid hub id") from error
    try:
        return Path(download(model_id, True))
    except Exception:
        pass
    try:
        return Path(download(model_id, False))
    except Exception as error:
        why = f"is not in the local Hugging Face cache and the hub is unreachable or lacks it ({_first_line(error)})"
        raise _unavailable(model_id, why) from error


def _download_pipeline(model_id: str, local_only: bool) -> str:
    """Only the files a pipeline needs (not every fp16/ema/ckpt variant of each weight). diffusers' own warning when
    the hub is out of reach stays quiet: the error the caller raises says all of it."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return DiffusionPipeline.download(model_id, local_files_only=local_only)
    finally:
        diffusers_logging.set_verbosity(level)


def _download_vae(vae_id: str, local_only: bool) -> str:
    return snapshot_download(vae_id, allow_patterns=["config.json", "*.safetensors"], local_files_only=local_only)


def resolve_model(model_id: str, root: Path) -> Path:
    """The diffusers folder for a preset name (built on first use), a local folder or a hub id."""
    if model_id in PRESETS:
        return _build_preset(model_id, root)
    if model_id in SHIPPED:
        folder = _preset_folder(model_id, root)
        if not (folder / "model_index.json").is_file():
            raise ModelUnavailable(
                f"preset {model_id!r} should ship in {folder}, which is missing; restore it with git or a reinstall"
            )
        return folder
    return _folder_or_hub(model_id, "model_index.json", "a diffusers pipeline", _download_pipeline, "a preset, ")


def cached_folder(model_id: str) -> Path | None:
    """An existing folder, or a hub repo already in the local Hugging Face cache (whole); never downloads."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # invalid id, not cached, offline: all mean "not here"
        return None


def local_model_folder(model_id: str, root: Path) -> Path | None:
    """The model's diffusers folder when it is on disk or cheap to build (tiny presets), without downloading;
    None otherwise (a hub id not in the local cache, an unbuilt full-size preset, a name that is nothing)."""
    if model_id in ARCH_PRESETS:
        folder = _preset_folder(model_id, root)
        return folder if folder.is_dir() else None
    try:
        if model_id in PRESETS or model_id in SHIPPED or Path(model_id).expanduser().is_dir():
            return resolve_model(model_id, root)
        validate_repo_id(model_id)
        return Path(_download_pipeline(model_id, True))
    except Exception:  # not on disk: the caller decides what an unknown model means
        return None


def hub_repo(model_id: str) -> str | None:
    """The model's hub repository id (`org/name`), or None for a preset or a folder: what a model card may name as
    its base model."""
    if model_id in PRESETS or model_id in SHIPPED or Path(model_id).expanduser().exists() or model_id.count("/") != 1:
        return None
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return None
    return model_id


@dataclass(frozen=True)
class ResolvedModel:
    """A base model found on disk: where it is, and the identities that cache keys use instead of paths."""

    id: str
    path: Path
    family: str
    vae_path: Path
    identities: dict[str, str]

    def identity(self, *components: str) -> dict[str, str]:
        return {name: self.identities[name] for name in components}


def resolve(model_id: str, vae_id: str, root: Path) -> ResolvedModel:
    """Resolve the base pipeline (and an optional separate VAE) once, hashing each component's files: only those
    that changed since a run with this artifact root last hashed them."""
    path = resolve_model(model_id, root)
    components = [c for c in json.loads((path / "model_index.json").read_text()) if not c.startswith("_")]
    vae_path = resolve_vae(vae_id) if vae_id else path / "vae"
    with HashMemo(root) as memo:
        identities = {c: component_identity(path, c, memo.sha256) for c in components if (path / c).is_dir()}
        if vae_id:
            identities["vae"] = component_identity(vae_path, "", memo.sha256)
    return ResolvedModel(model_id, path, model_family(path), vae_path, identities)


def available_family(model_id: str, root: Path) -> str:
    """The model's family, once the model proved to be at hand: without building a preset or hashing a file, so a
    run can check it before anything starts."""
    return PRESETS[model_id].family if model_id in PRESETS else model_family(resolve_model(model_id, root))


def resolve_vae(vae_id: str) -> Path:
    """A standalone AutoencoderKL: a local folder with config.json, or a hub repo such as sdxl-vae-fp16-fix."""
    return _folder_or_hub(vae_id, "config.json", "a diffusers AutoencoderKL", _download_vae, "")


def _folder_or_hub(model_id: str, marker: str, kind: str, download: Callable[[str, bool], str], preset: str) -> Path:
    """A local folder holding `marker`, or the hub repo's snapshot (from the local cache first); `preset` says
    whether a preset name would also have been accepted, for the error."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / marker).is_file():
            raise ModelUnavailable(f"folder {str(local)!r} has no {marker}: not {kind}")
        return local
    return _hub_snapshot(model_id, download, f"{preset}an existing folder")


def model_family(path: Path) -> str:
    """'sd15' or 'sdxl', from the pipeline class named in model_index.json."""
    class_name = json.loads((path / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    if class_name not in FAMILIES:
        raise ValueError(f"{path}: unsupported pipeline {class_name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[class_name]


def component_identity(path: Path, component: str, sha256: Callable[[Path], str] = file_sha256) -> str:
    """A location-free identity of one component (unet, vae, ...; "" for a standalone component folder)
    for cache keys: changes with any of its files. `sha256` hashes a file (`HashMemo.sha256` remembers it)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        return f"hub:{repo}@{path.name}"
    folder = path / component if component else path
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no such model component")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(folder).as_posix()}\0{sha256(file)}\n".encode())
    return digest.hexdigest()


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models(root: Path) -> list[dict[str, Any]]:
    """One row per preset for `boothflow models ls`: what it is, whether it is built under `root`, where."""
    rows = []
    for name, preset in (PRESETS | SHIPPED).items():
        folder = _preset_folder(name, root)
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
