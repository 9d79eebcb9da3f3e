"""Latents stage: encode each preprocessed (and class) image once into the VAE's latent distribution, mean and logvar.

Training samples from that distribution with its own seeded generator, so it never loads the VAE and cached training
is the uncached formulation; items are cached by image bytes, VAE and settings, so a new image costs one encode.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from tasks.core.atomic import link_or_copy
from tasks.core.config import LatentsSection
from tasks.core.progress import track
from tasks.core.stage import Stage, StageError, StageResult, produced
from tasks.core.store import Store, stage_key
from tasks.sd.device import device, loaded
from tasks.sd.latent_dist import save_latent
from tasks.sd.models import ResolvedModel

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

STAGE = "latents"
ITEMS = "latents-items"
# 2: the size facts as one metadata entry, so a file's bytes do not vary run to run; 3: each image encoded alone, so
# its numbers do not depend on which images were missing beside it
CODE_VERSION = 3
LATENT_FILE = "latent.safetensors"


@dataclass(frozen=True)
class LatentsInputs:
    """The VAE to encode with, the preprocess result, and the class images result (None without prior)."""

    model: ResolvedModel
    instance: StageResult
    classes: StageResult | None


@dataclass(frozen=True)
class Sample:
    """One image to encode: its sample id, where its PNG is, its bytes' hash and its SDXL size metadata."""

    id: str
    kind: str
    image: Path
    sha256: str
    metadata: dict[str, str]


def stage_key_for(cfg: LatentsSection, inputs: LatentsInputs) -> str:
    """What the entry holds: each sample's id, kind and item key (its PNG's bytes and sizes, the VAE, the settings),
    never the upstream stages' keys, so a renamed photo or a rejected junk file upstream encodes nothing again."""
    vae = inputs.model.identity("vae")
    items = [(s.id, s.kind, item_key(cfg, vae, s)) for s in samples(inputs)]
    return stage_key(STAGE, CODE_VERSION, cfg.keyed(), items=items, vae=vae)


def item_key(cfg: LatentsSection, vae_identity: dict[str, str], sample: Sample) -> str:
    """Per-image key: the PNG's bytes, the VAE, the settings and the stored size metadata, never the file name.

    The metadata is part of the key because two sources can be cut down to identical PNG bytes from different
    original sizes or crops, and the entry stores them.
    """
    return stage_key(ITEMS, CODE_VERSION, cfg.keyed(), image=sample.sha256, vae=vae_identity, sizes=sample.metadata)


def _pair(values: tuple[int, int]) -> str:
    return f"{values[0]},{values[1]}"


def _instance_metadata(original_size: tuple[int, int], crop_box: tuple[int, int, int, int], res: int) -> dict[str, str]:
    """SDXL size conditioning of a preprocessed image: original "W,H", and the crop's top-left corner in the frame
    where the crop is `res` pixels wide, as SDXL measured it (the source resized by res / crop side, then cropped);
    `crop_top_left_flipped` is that corner in the mirrored frame."""
    left, top, right, _ = crop_box
    scale = res / (right - left)
    corner = (round(top * scale), round(left * scale))
    flipped = (round(top * scale), round((original_size[0] - right) * scale))
    return {
        "original_size": _pair(original_size),
        "crop_top_left": _pair(corner),
        "crop_top_left_flipped": _pair(flipped),
        "target_size": _pair((res, res)),
    }


def _class_metadata(res: int) -> dict[str, str]:
    """Class images are rendered at the training size: nothing was cropped."""
    return {
        "original_size": _pair((res, res)),
        "crop_top_left": "0,0",
        "crop_top_left_flipped": "0,0",
        "target_size": _pair((res, res)),
    }


def _read_table(result: StageResult) -> pd.DataFrame:
    table_path = Path(result.path) / "items.csv"
    if not table_path.is_file():
        raise StageError(STAGE, f"the {result.stage} output has no items.csv; run that stage again", str(table_path))
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    return table[table["status"] == "ok"]


def _square_side(image: Path) -> int:
    try:
        with Image.open(image) as opened:
            width, height = opened.size
    except (OSError, ValueError) as err:
        raise StageError(
            STAGE, f"cannot read the upstream image ({err}); run the upstream stage again", str(image)
        ) from err
    if width != height:
        raise StageError(
            STAGE, f"upstream image is {width}x{height}, not square; run the upstream stage again", str(image)
        )
    return width


def samples(inputs: LatentsInputs) -> list[Sample]:
    """Every usable upstream image in index order: instance ids sorted, then class ids sorted. Their bytes' hashes come
    from the upstream manifests, so naming them reads no image."""
    found = []
    digests = produced(inputs.instance, "images")
    for row in _read_table(inputs.instance).itertuples():
        image = Path(inputs.instance.path) / row.image
        meta = _instance_metadata(
            tuple(json.loads(row.original_size)), tuple(json.loads(row.crop_box)), _square_side(image)
        )
        found.append(Sample(row.source_sha256[:16], "instance", image, digests[row.image], meta))
    found.sort(key=lambda s: s.id)
    if inputs.classes is not None:
        class_samples = []
        digests = produced(inputs.classes, "images")
        for row in _read_table(inputs.classes).itertuples():
            image = Path(inputs.classes.path) / row.image
            meta = _class_metadata(_square_side(image))
            class_samples.append(Sample(row.id, "class", image, digests[row.image], meta))
        found += sorted(class_samples, key=lambda s: s.id)
    sizes = {s.metadata["target_size"] for s in found}
    if len(sizes) > 1:
        raise StageError(
            STAGE,
            f"images come in several sizes ({', '.join(sorted(sizes))}); class images must be rendered at "
            "preprocess.resolution, so rerun class_images with it",
        )
    return found


def vae_settings(vae_path: Path) -> dict[str, Any]:
    """Scaling, shift and channels from the VAE's config (AutoencoderKL's defaults where it is silent)."""
    from diffusers import AutoencoderKL

    config = json.loads((Path(vae_path) / "config.json").read_text())
    defaults = inspect.signature(AutoencoderKL.__init__).parameters
    return {
        name: config.get(name, defaults[name].default) for name in ("scaling_factor", "shift_factor", "latent_channels")
    }


def _load_vae(vae_path: Path, dtype: str) -> AutoencoderKL:
    from diffusers import AutoencoderKL  # here, so a fully cached run never imports diffusers

    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=getattr(torch, dtype))
    return loaded(vae.to(device()).eval())


def _pixels(image: Path) -> torch.Tensor:
    """A PNG as the VAE takes it: float32 [3, H, W] in [-1, 1]."""
    with Image.open(image) as opened:
        array = np.asarray(opened.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1


@torch.no_grad()
def _encode(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (clamped) logvar of the VAE's latent distribution, float32 on the CPU whatever the VAE's dtype."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.logvar.float().cpu()


def _encode_sample(vae: AutoencoderKL, sample: Sample, flip: bool, dtype: str) -> dict[str, torch.Tensor]:
    """Mean and logvar of one image (and of its mirror image when `flip`), each from a forward pass of its own: a
    batched convolution rounds by its batch's shape, so an item encoded beside whichever other images happened to be
    missing would differ in its last bits from the same item encoded alone on another machine or another night."""
    try:
        pixels = _pixels(sample.image)[None]
    except (OSError, ValueError) as err:
        raise StageError(
            STAGE, f"cannot read the upstream image ({err}); run the upstream stage again", str(sample.image)
        ) from err
    views = {"": pixels, "_flipped": pixels.flip(-1)} if flip else {"": pixels}
    tensors: dict[str, torch.Tensor] = {}
    for suffix, view in views.items():
        mean, logvar = _encode(vae, view)
        if not (mean.isfinite().all() and logvar.isfinite().all()):
            raise StageError(
                STAGE,
                f"the VAE gave NaN or inf in {dtype}; set latents.dtype=float32 or use a VAE made for it "
                "(e.g. madebyollin/sdxl-vae-fp16-fix)",
                sample.id,
            )
        tensors[f"mean{suffix}"], tensors[f"logvar{suffix}"] = mean[0], logvar[0]
    return tensors


def _write_item(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[Path], dict[str, Any]]:
    def build(folder: Path) -> dict[str, Any]:
        save_latent(folder / LATENT_FILE, tensors, metadata)
        return {"shape": list(tensors["mean"].shape), **metadata}

    return build


def _encode_missing(cfg: LatentsSection, inputs: LatentsInputs, missing: list[Sample], store: Store) -> int:
    """Encode `missing` (one sample per item key), one image at a time; the number of entries this call created."""
    vae_identity = inputs.model.identity("vae")
    vae = _load_vae(inputs.model.vae_path, cfg.dtype)
    created = 0
    for sample in track(missing, len(missing), "encode latents"):
        try:
            build = _write_item(_encode_sample(vae, sample, cfg.flip, cfg.dtype), sample.metadata)
            created += store.get_or_create(ITEMS, item_key(cfg, vae_identity, sample), build, cfg.keyed()).created
        except StageError:
            raise
        except Exception as err:
            message = f"unexpected {type(err).__name__} while encoding: {err}"
            raise StageError(STAGE, message, str(sample.image)) from err
    return created


def build(cfg: LatentsSection, inputs: LatentsInputs, store: Store, key: str) -> StageResult:
    """Encode every usable upstream image, reusing cached items; the VAE is loaded only when one is missing."""
    found = samples(inputs)
    vae_identity = inputs.model.identity("vae")
    keys = {s.id: item_key(cfg, vae_identity, s) for s in found}
    missing = {keys[s.id]: s for s in found if store.get(ITEMS, keys[s.id]) is None}
    processed = _encode_missing(cfg, inputs, list(missing.values()), store) if missing else 0

    def write(folder: Path) -> dict[str, Any]:
        items = folder / "items"
        items.mkdir()
        rows = []
        for sample in found:
            file = f"items/{sample.id}.safetensors"
            link_or_copy(store.path(ITEMS, keys[sample.id]) / LATENT_FILE, folder / file)
            rows.append({"id": sample.id, "kind": sample.kind, "file": file})
        pd.DataFrame(rows, columns=["id", "kind", "file"]).to_csv(folder / "index.csv", index=False)
        vae = {**vae_settings(inputs.model.vae_path), "flip": cfg.flip}
        (folder / "vae.json").write_text(json.dumps(vae, indent=1))
        kinds = [s.kind for s in found]
        return {"items": len(found), "instance": kinds.count("instance"), "class": kinds.count("class")}

    entry = store.get_or_create(STAGE, key, write, cfg.keyed())
    loaded = (f"vae ({inputs.model.id})",) if missing else ()
    return StageResult(STAGE, key, entry.path, processed, len(found) - processed, models_loaded=loaded)


stage = Stage(STAGE, "latents", stage_key_for, build, outputs={})
run = stage.run  # the plain function: cached entry or build
