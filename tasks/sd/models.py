"""Base models by preset name, local folder or hub id, and the location-free identities that cache keys use.

Tiny vs real is only a model id: every stage resolves its model here, so CPU tests run the real loading path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from tasks.core.hash_memo import HashMemo
from tasks.core.manifest import file_sha256
from tasks.sd.presets import ARCH_PRESETS, PRESETS, SHIPPED, build_preset, preset_folder

FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


class ModelUnavailable(Exception):
    """A model id that is neither a preset, a local folder, nor reachable on the hub or in its cache."""


def _unavailable(model_id: str, why: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"model {model_id!r} {why}; pass a local diffusers folder, set HF_HOME to a cache that has it,"
        f" or use a preset such as {' or '.join(PRESETS)}"
    )


def _first_line(error: Exception, limit: int = 200) -> str:
    line = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


Download = Callable[[str, bool, str | None], str]  # (repo id, local files only, revision) -> snapshot folder


def _hub_snapshot(model_id: str, download: Download, what: str, revision: str = "") -> Path:
    """The cached snapshot of a hub repo (at `revision`; empty: main), looked up with the file patterns its download
    uses (a cache filled by a pipeline download lacks the repo's other files, so a plain snapshot lookup would call it
    incomplete); the download runs only when the cache does not have it."""
    try:
        validate_repo_id(model_id)
    except HFValidationError as error:
        raise _unavailable(model_id, f"is not {what} or a valid hub id") from error
    try:
        return Path(download(model_id, True, revision or None))
    except Exception:
        pass
    try:
        return Path(download(model_id, False, revision or None))
    except Exception as error:
        at = f"at revision {revision!r} " if revision else ""
        why = (
            f"{at}is not in the local Hugging Face cache and the hub is unreachable or lacks it ({_first_line(error)})"
        )
        raise _unavailable(model_id, why) from error


def _download_pipeline(model_id: str, local_only: bool, revision: str | None = None) -> str:
    """Only the files a pipeline needs (not every fp16/ema/ckpt variant of each weight). diffusers' own warning when
    the hub is out of reach stays quiet: the error the caller raises says all of it."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return DiffusionPipeline.download(model_id, local_files_only=local_only, revision=revision)
    finally:
        diffusers_logging.set_verbosity(level)


def _download_vae(vae_id: str, local_only: bool, revision: str | None = None) -> str:
    patterns = ["config.json", "*.safetensors"]
    return snapshot_download(vae_id, allow_patterns=patterns, local_files_only=local_only, revision=revision)


def resolve_model(model_id: str, root: Path, revision: str = "") -> Path:
    """The diffusers folder for a preset name (built on first use), a local folder or a hub id (at `revision`)."""
    if model_id in PRESETS:
        return build_preset(model_id, root)
    if model_id in SHIPPED:
        folder = preset_folder(model_id, root)
        if not (folder / "model_index.json").is_file():
            raise ModelUnavailable(
                f"preset {model_id!r} should ship in {folder}, which is missing; restore it with git or a reinstall"
            )
        return folder
    return _folder_or_hub(
        model_id, "model_index.json", "a diffusers pipeline", _download_pipeline, "a preset, ", revision
    )


def cached_folder(model_id: str) -> Path | None:
    """An existing folder, or a hub repo already in the local Hugging Face cache (whole); never downloads."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # invalid id, not cached, offline: all mean "not here"
        return None


def local_model_folder(model_id: str, root: Path, revision: str = "") -> Path | None:
    """The model's diffusers folder when it is on disk or cheap to build (tiny presets), without downloading;
    None otherwise (a hub id not in the local cache, an unbuilt full-size preset, a name that is nothing)."""
    if model_id in ARCH_PRESETS:
        folder = preset_folder(model_id, root)
        return folder if folder.is_dir() else None
    try:
        if model_id in PRESETS or model_id in SHIPPED or Path(model_id).expanduser().is_dir():
            return resolve_model(model_id, root)
        validate_repo_id(model_id)
        return Path(_download_pipeline(model_id, True, revision or None))
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


def resolve(model_id: str, vae_id: str, root: Path, revision: str = "", vae_revision: str = "") -> ResolvedModel:
    """Resolve the base pipeline (and an optional separate VAE), each at its hub revision, once, hashing each
    component's files: only those that changed since a run with this artifact root last hashed them."""
    path = resolve_model(model_id, root, revision)
    components = [c for c in json.loads((path / "model_index.json").read_text()) if not c.startswith("_")]
    vae_path = resolve_vae(vae_id, vae_revision) if vae_id else path / "vae"
    with HashMemo(root) as memo:
        identities = {c: component_identity(path, c, memo.sha256) for c in components if (path / c).is_dir()}
        if vae_id:
            identities["vae"] = component_identity(vae_path, "", memo.sha256)
    return ResolvedModel(model_id, path, model_family(path), vae_path, identities)


def available_family(model_id: str, root: Path, revision: str = "") -> str:
    """The model's family, once the model proved to be at hand: without building a preset or hashing a file, so a
    run can check it before anything starts."""
    return PRESETS[model_id].family if model_id in PRESETS else model_family(resolve_model(model_id, root, revision))


def resolve_vae(vae_id: str, revision: str = "") -> Path:
    """A standalone AutoencoderKL: a local folder with config.json, or a hub repo such as sdxl-vae-fp16-fix."""
    return _folder_or_hub(vae_id, "config.json", "a diffusers AutoencoderKL", _download_vae, "", revision)


def _folder_or_hub(model_id: str, marker: str, kind: str, download: Download, preset: str, revision: str) -> Path:
    """A local folder holding `marker`, or the hub repo's snapshot at `revision` (from the local cache first);
    `preset` says whether a preset name would also have been accepted, for the error."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / marker).is_file():
            raise ModelUnavailable(f"folder {str(local)!r} has no {marker}: not {kind}")
        return local
    return _hub_snapshot(model_id, download, f"{preset}an existing folder", revision)


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
