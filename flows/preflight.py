"""Everything a run can check before its first stage: paths, names and pairs that would otherwise fail hours in.

`boothflow run` and `stage` call it before any stage starts (a failure is one line and exit code 2), and the flow
calls it first, so a run started from the UI or a deployment fails the same way before any stage. A run submitted
to a work pool is checked here only for what does not depend on the machine (`check_settings`); the worker that
runs it checks the rest.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from tasks.core.config import ConfigError, RunConfig
from tasks.core.photos import PhotosUnreachable, listing
from tasks.core.remote import Remote
from tasks.core.stage import StageError
from tasks.core.store import RemoteError
from tasks.sd.models import ModelUnavailable, available_family, hub_repo, resolve_vae
from tasks.stages.train import SUPPORTED, read_captions


def _writable_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"run.artifacts_root = {str(root)!r}: cannot write there ({reason}); pass --artifacts with a folder you "
            "can write"
        ) from None


def _shared_store(config: RunConfig) -> None:
    if config.run.store:
        try:
            Remote(config.run.store, config.run.store_options).check()
        except RemoteError as err:
            raise ConfigError(err.message) from None


def _instance_folder(folder: Path | str, options: dict) -> None:
    if isinstance(folder, str):  # a URL
        try:
            found = listing(folder, options)
        except PhotosUnreachable as err:
            raise ConfigError(str(err)) from None
        if not found:
            raise ConfigError(f"data.instance_dir = {folder!r} holds no files; set it to the URL of the images")
        return
    if not folder.is_dir():
        what = "is a file" if folder.is_file() else "does not exist"
        raise ConfigError(f"data.instance_dir = {str(folder)!r} {what}; set it to a folder of images")


def _model_and_method(config: RunConfig) -> None:
    model = config.model
    for setting, revision, pinned in (("model.revision", model.revision, model.id), ("model.vae_revision",
                                      model.vae_revision, model.vae)):  # fmt: skip
        if revision and hub_repo(pinned) is None:
            raise ConfigError(f"{setting} = {revision!r} pins a hub repo, and {pinned!r} is not one (a preset, a "
                              f"folder or empty): remove {setting}")  # fmt: skip
    try:
        family = available_family(model.id, config.run.artifacts_root, model.revision)
    except (ModelUnavailable, ValueError, OSError) as err:
        raise ConfigError(f"model.id = {model.id!r}: {err}") from None
    if model.vae:
        try:
            resolve_vae(model.vae, model.vae_revision)
        except (ModelUnavailable, OSError) as err:
            raise ConfigError(f"model.vae = {model.vae!r}: {err}") from None
    if (family, config.train.method) not in SUPPORTED:
        methods = ", ".join(method for known, method in sorted(SUPPORTED) if known == family)
        raise ConfigError(
            f"train.method = {config.train.method!r} is not supported for {family} models ({config.model.id}); "
            f"use {methods}"
        )


def check_settings(config: RunConfig) -> None:
    """Raise ConfigError (one line naming the setting or path and what to do) for anything a stage would trip on that
    does not depend on this machine's devices: what a run submitted to other machines can check here."""
    _writable_root(config.run.artifacts_root)
    _shared_store(config)
    _instance_folder(config.data.instance_dir, config.run.store_options)
    _model_and_method(config)
    _captions(config)
    _pick(config)
    _publish(config)


def check_before_start(config: RunConfig) -> None:
    """`check_settings`, and the training processes against this machine's devices: a run that starts here."""
    check_settings(config)
    _processes(config)


def _processes(config: RunConfig) -> None:
    """Each training process needs a CUDA device of its own, or without CUDA a CPU core this process may use."""
    wanted = config.train.num_processes
    if wanted == 1:  # always fits: no device query
        return
    if torch.cuda.is_available():
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        most, what = torch.cuda.device_count(), f"visible CUDA devices{f': {shown}' if shown is not None else ''}"
    else:
        most, what = len(os.sched_getaffinity(0)), "CPU cores; no CUDA device"
    if wanted > most:
        raise ConfigError(f"train.num_processes = {wanted}: this machine can run at most {most} training processes "
                          f"({what})")  # fmt: skip


PICK_NEEDS = {"clip_t": "clip_model", "clip_i": "clip_model", "dino": "dino_model", "analyser": "analyser"}


def _publish(config: RunConfig) -> None:
    """The promotion gate's metric comes from the evaluate stage: its scorer must be set."""
    metric = config.publish.metric
    if metric and not getattr(config.evaluate, PICK_NEEDS[metric]):
        raise ConfigError(f"publish.metric = {metric!r} is scored by evaluate.{PICK_NEEDS[metric]}: set it, or empty "
                          "publish.metric to publish every night's model")  # fmt: skip


def _pick(config: RunConfig) -> None:
    """A best pick needs validation prompts to render at each kept step, and the scorer its metric comes from."""
    if config.train.pick == "last":
        if config.train.pick_margin:
            raise ConfigError("train.pick_margin applies to a best pick: set train.pick = 'best:<metric>' or drop it")
        return
    needed = PICK_NEEDS[config.train.pick.removeprefix("best:")]
    if not config.train.sample_every:
        raise ConfigError(f"train.pick = {config.train.pick!r} chooses among kept steps: set train.sample_every, "
                          "e.g. 100")  # fmt: skip
    if not config.generate.validation_prompts:
        raise ConfigError(f"train.pick = {config.train.pick!r} scores the validation prompts: set "
                          "generate.validation_prompts")  # fmt: skip
    if not getattr(config.evaluate, needed):
        raise ConfigError(f"train.pick = {config.train.pick!r} needs evaluate.{needed} to score the steps")


def _captions(config: RunConfig) -> None:
    """Every caption file reads as text, before a run spends its preprocessing on the way to training."""
    if config.data.captions == "sidecar" and isinstance(config.data.instance_dir, Path):  # a URL's: once mirrored
        try:
            read_captions(config.data)
        except StageError as err:
            raise ConfigError(f"data.captions = 'sidecar': {err.item}: {err.message}") from None
