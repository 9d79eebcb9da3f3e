"""Exports: what users load, written from the trained weights a train (or select) entry keeps.

sd15: the diffusers folder as a hub repository lays it out, and beside it the A1111 / ComfyUI single file; every
component training left as it was (VAE, tokenizer, scheduler ...) is linked from the base model (a hard link; a copy
across filesystems) when its weights already are in the asked dtype. sdxl: the LoRA in diffusers' and kohya's
layouts. Each file is in the layout its consumer loads, so a run's result is usable as is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel

from tasks.core.atomic import link_or_copy
from tasks.sd.layout import KOHYA_FILE, LORA_FILE, SINGLE_FILE
from tasks.sd.ldm import ldm_text_encoder_state, ldm_unet_state, ldm_vae_state
from tasks.sd.swap import component_class

TRAINED = ("unet", "text_encoder")  # the components a full fine-tune changes (the text encoder when trained)
STORED_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # safetensors' names
FLOATS = frozenset(STORED_DTYPE.values()) | {"F64", "F8_E4M3", "F8_E5M2"}
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx"})
NAMING_FIELDS = ("_name_or_path", "name_or_path")  # config fields that would name the folder a base was loaded from


def _has_safety_checker(index: dict[str, Any]) -> bool:
    return (index.get("safety_checker") or [None])[0] is not None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _tensor_count(path: Path) -> int:
    with safe_open(path, framework="pt") as file:
        return len(file.keys())


def _float_dtypes(path: Path) -> set[str]:
    """The floating dtypes a safetensors file stores (read from its header, no tensor loaded)."""
    with safe_open(path, framework="pt") as file:
        names = file.keys()
        return {dtype for name in names if (dtype := file.get_slice(name).get_dtype()) in FLOATS}


def _main_weights(files: list[Path]) -> list[Path]:
    """The weights save_pretrained writes and from_pretrained prefers: safetensors without a variant (`.fp16.`),
    sharded or not."""
    return [f for f in files if f.suffix == ".safetensors" and "." not in f.stem]


def _kept_file(path: Path) -> bool:
    """Whether a file of a base component belongs in the export: not another weight format or a variant, and no
    shard index but safetensors' own."""
    if path.suffix in WEIGHT_SUFFIXES:
        return bool(_main_weights([path]))
    return not re.search(r"\.index(\.[^.]+)?\.json$", path.name) or path.name.endswith(".safetensors.index.json")


def _linkable(folder: Path, dtype: str) -> bool:
    """A component that can be linked as it is: no weights (tokenizer, scheduler, feature extractor), or safetensors
    weights whose floating tensors are all in `dtype` already."""
    files = [f for f in folder.rglob("*") if f.is_file()]
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        return True
    main = _main_weights(files)
    return bool(main) and all(_float_dtypes(f) <= {STORED_DTYPE[dtype]} for f in main)


def _write_config(source: Path, target: Path, base_id: str) -> None:
    """A JSON file of a component, written anew (never linked: the base's own file must not change): any field that
    names the folder the base was loaded from names `base_id` instead."""
    data = json.loads(source.read_text(encoding="utf-8"))
    if isinstance(data, dict) and any(field in data for field in NAMING_FIELDS):
        data.update({field: base_id for field in NAMING_FIELDS if field in data})
        target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    elif source != target:
        target.write_bytes(source.read_bytes())


def _link_component(source: Path, target: Path, base_id: str) -> None:
    for path in sorted(p for p in source.rglob("*") if p.is_file() and _kept_file(p)):
        to = target / path.relative_to(source)
        to.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            _write_config(path, to, base_id)
        else:
            link_or_copy(path, to)


def _save_component(source: Path, target: Path, spec: list[str], dtype: str, base_id: str) -> None:
    """A component loaded by the class the pipeline names, cast to `dtype` and saved as save_pretrained lays it out."""
    module = component_class(spec).from_pretrained(source, dtype=getattr(torch, dtype))
    module.save_pretrained(target, safe_serialization=True)
    for config in target.rglob("*.json"):
        _write_config(config, config, base_id)


def _single_file(out: Path, dtype: str) -> dict[str, int]:
    """`model.safetensors`: the exported UNet, VAE and text encoder in the LDM layout; tensors per part."""
    torch_dtype = getattr(torch, dtype)
    parts = {
        "unet": ldm_unet_state(UNet2DConditionModel.from_pretrained(out / "unet", dtype=torch_dtype)),
        "vae": ldm_vae_state(AutoencoderKL.from_pretrained(out / "vae", dtype=torch_dtype)),
        "text_encoder": ldm_text_encoder_state(CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch_dtype)),
    }
    save_file({k: v for part in parts.values() for k, v in part.items()}, out / SINGLE_FILE, metadata={"format": "pt"})
    return {name: len(part) for name, part in parts.items()}


def sd15_sources(
    base: Path, weights: Path, safety_checker: bool = False, vae_path: Path | None = None
) -> tuple[dict[str, Any], dict[str, Path], str]:
    """The exported pipeline's model_index (the base's, its safety checker removed unless kept), the folder each
    component comes from (the trained weights, a separate VAE, else the base), and what became of the checker."""
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    checker = "none in base model"
    if _has_safety_checker(index):
        checker = "kept" if safety_checker else "removed"
        if not safety_checker:
            index.update(safety_checker=[None, None], requires_safety_checker=False)
    sources = {name: base / name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None}
    if vae_path is not None:
        sources["vae"] = vae_path
    sources.update({name: weights / name for name in TRAINED if (weights / name).is_dir()})
    return index, dict(sorted(sources.items())), checker


def export_sd15(
    base: Path,
    weights: Path,
    out: Path,
    dtype: str = "float32",
    single_file: bool = True,
    safety_checker: bool = False,
    vae_path: Path | None = None,
    base_id: str | None = None,
    done: Callable[[str], None] = lambda part: None,
) -> dict[str, Any]:
    """The base pipeline with the trained UNet (and text encoder, when `weights` holds one) as a diffusers folder in
    `out`, in `dtype`; with `single_file`, the same weights in the LDM layout beside it. The base's safety checker is
    kept only when asked for, so the choice is explicit and lands in the model card; a separate VAE (the one training
    latents came from) replaces the base's. Configs name the base as `base_id` (default: its folder's name), never by
    the folder it was loaded from on this machine. `done` hears of each part written (a component, the single file).
    Paths in the facts are relative to `out`."""
    base_id = base_id or base.name
    index, sources, checker = sd15_sources(base, weights, safety_checker, vae_path)
    out.mkdir(parents=True, exist_ok=True)
    linked = []  # the components whose files are links (to the base, the separate VAE, or the trained weights)
    for name, source in sources.items():
        if _linkable(source, dtype):
            _link_component(source, out / name, base_id)
            linked.append(name)
        else:
            _save_component(source, out / name, index[name], dtype, base_id)
        done(name)
    (out / "model_index.json").write_text(json.dumps({**index, "_name_or_path": base_id}, indent=2, sort_keys=True))
    files = {f"{name}/": {"bytes": _size(out / name), "tensors": None} for name in sources}
    facts: dict[str, Any] = {"family": "sd15", "lora": False, "dtype": dtype, "safety_checker": checker}
    facts["linked"] = linked
    if single_file:
        facts["ldm_tensors"] = _single_file(out, dtype)
        files[SINGLE_FILE] = {"bytes": _size(out / SINGLE_FILE), "tensors": _tensor_count(out / SINGLE_FILE)}
        done(SINGLE_FILE)
    return {**facts, "files": files}


def export_lora(weights: Path, out: Path, dtype: str = "float32", kohya: bool = True) -> dict[str, Any]:
    """The LoRA files training wrote (diffusers' layout and, with `kohya`, kohya's), in `dtype`: linked when they are
    in it already (training writes float32), else cast."""
    out.mkdir(parents=True, exist_ok=True)
    names = [LORA_FILE, *([KOHYA_FILE] if kohya else [])]
    for name in names:
        source = weights / name
        if _float_dtypes(source) <= {STORED_DTYPE[dtype]}:
            link_or_copy(source, out / name)
            continue
        with safe_open(source, framework="pt") as file:
            keys, metadata = file.keys(), file.metadata()
            tensors = {key: file.get_tensor(key) for key in keys}
        cast = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(cast, out / name, metadata=metadata)
    files = {name: {"bytes": _size(out / name), "tensors": _tensor_count(out / name)} for name in names}
    return {"family": "sdxl", "lora": True, "dtype": dtype, "files": files}


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
