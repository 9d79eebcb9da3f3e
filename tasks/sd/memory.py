"""The memory estimates: peak accelerator memory of the training and rendering stages, before anything loads.

Weights, gradients and optimizer state are counted on the architecture built on the meta device (no weights
allocated); activations by tracing one forward pass there. Calibrated against measured peaks (README,
benchmarks/RESULTS.md); memory_plan.py judges a config's estimates against the device.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.core.config import TrainSection
from tasks.core.values import GIB
from tasks.sd import models, presets, text
from tasks.sd.architectures import COMPONENT_CONFIGS, KNOWN_HUB_FAMILIES

RUNTIME = 1 * GIB  # the CUDA context and kernels' workspace, or a Python process with torch loaded on a CPU
WARN_MARGIN = 0.10  # within this fraction of the device's memory, the plan warns
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "no": 4, "fp16": 2, "bf16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # state per trainable parameter: two moments
# Scratch per trainable parameter during the optimizer step: CUDA's multi-tensor AdamW builds the update's
# denominator for every parameter at once (measured: an SD 1.5 full fine-tune peaks at 5x its fp32 weights, in the
# step); bitsandbytes' 8-bit step updates in place.
STEP_BYTES = {"adamw": 4, "adamw8bit": 0}
PARTS = ("weights", "gradients", "optimizer", "activations", "optimizer step", "working set", "runtime")
MIXED_ACTIVATIONS = 0.7  # autocast halves matmul and conv outputs, norms stay in float32: 0.69 measured (SDXL, 1024 px)


class MemoryPlanError(Exception):
    """A config whose estimated peak exceeds the device's memory, or a precision the device cannot run."""


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def cuda_memory() -> int | None:
    """The total memory of the first CUDA device, or None without CUDA."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


@dataclass(frozen=True)
class Estimate:
    """One stage's estimated peak, by part (bytes)."""

    stage: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size / GIB:.1f}" for name, size in self.parts.items() if size)
        return f"{self.stage} needs ~{gib(self.total)} ({parts} GiB)"


@dataclass(frozen=True)
class Architecture:
    """A model's component configs by folder name (unet, vae, text_encoder, ...) and its family."""

    family: str
    configs: dict[str, dict[str, Any]] = field(repr=False)


def architecture(model_id: str, root: Path, revision: str = "") -> Architecture | None:
    """The architecture of a model without loading weights: from its folder when it is on disk (presets, folders,
    the local hub cache), else from the configs written here for known hub ids; None when it is unknown."""
    if model_id in presets.ARCH_PRESETS:
        family = presets.ARCH_PRESETS[model_id]
        return Architecture(family, COMPONENT_CONFIGS[family])
    folder = models.local_model_folder(model_id, root, revision)
    if folder is not None:
        configs = {
            name: json.loads((folder / name / "config.json").read_text())
            for name in ("unet", "vae", *text.ENCODER_CLASSES)
            if (folder / name / "config.json").is_file()
        }
        return Architecture(models.model_family(folder), configs)
    family = KNOWN_HUB_FAMILIES.get(model_id)
    return Architecture(family, COMPONENT_CONFIGS[family]) if family else None


def meta_component(arch: Architecture, name: str) -> torch.nn.Module:
    """Component `name` on the meta device: shapes and parameters, no memory. Built there from the start (not
    moved there as accelerate's init_empty_weights does, which leaves the process gigabytes of untouched heap that a
    later fork must be able to commit)."""
    with torch.device("meta"):
        if name == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(arch.configs[name])
        if name == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(arch.configs[name])
        import transformers

        config = transformers.CLIPTextConfig.from_dict(arch.configs[name])
        return getattr(transformers, text.ENCODER_CLASSES[name])(config)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _add_lora(module: torch.nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Inject LoRA adapters as training does (on the meta device); returns their parameter count."""
    from peft import LoraConfig, inject_adapter_in_model

    before = count_parameters(module)
    module.requires_grad_(False)
    with torch.device("meta"):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), module)
    return count_parameters(module) - before


@contextlib.contextmanager
def _flash_attention() -> Iterator[None]:
    """Attention as memory-efficient kernels run it (CUDA's flash/efficient, CPU's flash): it saves its output
    and log-sum-exp for backward, never the token x token score matrix the math fallback would keep."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if attn_mask is not None:
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def _unet_inputs(arch: Architecture, samples: int, side: int) -> tuple[tuple, dict]:
    unet = arch.configs["unet"]
    latent = torch.empty(samples, unet.get("in_channels", 4), side, side, device="meta")
    context = torch.empty(samples, 77, unet["cross_attention_dim"], device="meta")
    kwargs: dict[str, Any] = {"return_dict": False}
    if unet.get("addition_embed_type") == "text_time":
        pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(samples, pooled, device="meta"),
            "time_ids": torch.empty(samples, 6, device="meta"),
        }
    return (latent, torch.zeros(samples, dtype=torch.long, device="meta"), context), kwargs


CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock")  # what diffusers' gradient checkpointing recomputes


@dataclass(frozen=True)
class Saved:
    """What one training forward pass keeps for backward (bytes): everything, the largest single tensor (the scale
    of backward's own buffers), and the most any one checkpointed unit keeps (what a recompute holds at once)."""

    total: int
    largest: int
    unit: int


def _saved_activations(unet: torch.nn.Module, arch: Architecture, samples: int, side: int) -> Saved:
    """Trace one forward pass on the meta device; parameters excluded, each tensor counted once."""
    params = {id(p) for p in unet.parameters()}
    saved: dict[int, torch.Tensor] = {}
    per_unit: dict[int, int] = {}
    active: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in params and id(base) not in saved:
            saved[id(base)] = base
            if active:
                per_unit[active[-1]] = per_unit.get(active[-1], 0) + base.numel() * base.element_size()
        return tensor

    def enter(module: torch.nn.Module, _: Any) -> None:
        active.append(id(module))

    def leave(*_: Any) -> None:
        active.pop()

    units = [m for m in unet.modules() if type(m).__name__ in CHECKPOINT_UNITS]
    hooks = [hook for m in units for hook in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    args, kwargs = _unet_inputs(arch, samples, side)
    try:
        with _flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    sizes = [t.numel() * t.element_size() for t in saved.values()]
    return Saved(sum(sizes), max(sizes, default=0), max(per_unit.values(), default=0))


def latent_side(arch: Architecture, resolution: int) -> int:
    """Latent pixels per side: the VAE halves the size once per block after the first."""
    return resolution // 2 ** (len(arch.configs["vae"]["block_out_channels"]) - 1)


def estimate_train(arch: Architecture, cfg: TrainSection, resolution: int, prior: bool) -> Estimate:
    """Peak of the training child: weights, gradients, optimizer state, and the larger of one micro-batch's
    activations and the optimizer step's scratch.

    Frozen text encoders are not loaded there (their embeddings are cached), so only trained ones count. Checkpoints
    add nothing: on CUDA their copy of the state is in host memory, which the plan does not model, and on a CPU they
    are written from the weights in place."""
    unet = meta_component(arch, "unet")
    trained = [name for name in text.ENCODER_CLASSES if name in arch.configs] if cfg.train_text_encoder else []
    encoders = [meta_component(arch, name) for name in trained]
    total = count_parameters(unet) + sum(count_parameters(e) for e in encoders)
    half = BYTES[cfg.mixed_precision]
    if cfg.method == "lora":
        trainable = _add_lora(unet, cfg.lora_targets, cfg.lora_rank)
        trainable += sum(_add_lora(encoder, text.LORA_TARGETS, cfg.lora_rank) for encoder in encoders)
        weights, casts = total * half + trainable * 4, 0  # frozen weights are stored in the autocast precision
    else:
        trainable = total
        weights = trainable * 4
        casts = trainable * half if cfg.mixed_precision != "no" else 0  # autocast's low-precision weight copies
    unet.train()
    samples, side = cfg.batch_size * (2 if prior else 1), latent_side(arch, resolution)
    saved = _saved_activations(unet, arch, samples, side)
    activations = saved.total + 2 * saved.largest
    if cfg.gradient_checkpointing:  # unit boundaries stay; one unit is recomputed at a time in backward
        unet.enable_gradient_checkpointing()
        activations = _saved_activations(unet, arch, samples, side).total + saved.unit + 2 * saved.largest
    scale = MIXED_ACTIVATIONS if cfg.mixed_precision != "no" else 1.0
    activations = int(activations * scale) + casts
    parts = {
        "weights": weights,
        "gradients": trainable * 4,
        "optimizer": trainable * OPTIMIZER_BYTES[cfg.optimizer],
        "activations": activations,
        # The step runs once backward has freed the activations: it adds only what its scratch needs beyond them.
        "optimizer step": max(0, trainable * STEP_BYTES[cfg.optimizer] - activations),
        "runtime": RUNTIME,
    }
    return Estimate("train", parts)


def _largest_outputs(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[int, int]:
    """The largest output of any leaf module in one inference pass and the bytes the UNet holds for its skip
    connections (down blocks' outputs), traced on the meta device."""
    largest, skips = [0], [0]

    def leaf(_, __, output) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    def down(_, __, output) -> None:
        skips[0] += sum(t.numel() * t.element_size() for t in output[1])

    hooks = [m.register_forward_hook(leaf) for m in module.modules() if not list(m.children())]
    hooks += [block.register_forward_hook(down) for block in getattr(module, "down_blocks", [])]
    try:
        with torch.no_grad(), _flash_attention():
            module(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return largest[0], skips[0]


def estimate_render(
    arch: Architecture, stage: str, dtype: str, batch: int, side: int, guidance: float, slicing: bool, tiling: bool
) -> Estimate:
    """Peak of a rendering stage: the pipeline's weights, the UNet's working set for one batch (twice the images
    with guidance) or the VAE decoding the batch (one image with slicing; one tile each with tiling), whichever is
    larger."""
    size = BYTES[dtype]
    vae = meta_component(arch, "vae")
    vae_bytes = 4 if arch.configs["vae"].get("force_upcast") and size == 2 else size  # SDXL's VAE decodes in fp32
    unet = meta_component(arch, "unet")
    encoders = [meta_component(arch, name) for name in text.ENCODER_CLASSES if name in arch.configs]
    weights = (count_parameters(unet) + sum(count_parameters(e) for e in encoders)) * size
    weights += count_parameters(vae) * vae_bytes
    args, kwargs = _unet_inputs(arch, batch * (2 if guidance > 1 else 1), latent_side(arch, side))
    largest, skips = _largest_outputs(unet, *args, **kwargs)
    tile = min(side, arch.configs["vae"].get("sample_size", side)) if tiling else side
    latent = torch.empty(1, arch.configs["vae"]["latent_channels"], *(2 * [latent_side(arch, tile)]), device="meta")
    decode, _ = _largest_outputs(vae.decoder, latent)
    decoded = 1 if slicing else batch
    working = max((skips + 3 * largest) * size // 4, 3 * decode * vae_bytes * decoded // 4)  # traced in float32
    return Estimate(stage, {"weights": weights, "working set": working, "runtime": RUNTIME})
