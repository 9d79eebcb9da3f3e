"""Train stage: DreamBooth fine-tuning in a child process under accelerate, resumed from checkpoints.

The child streams JSON lines that become logs, a progress bar and Prefect progress; frozen text encoders'
embeddings are cached here first so the child never loads them, and the VAE is never loaded at all.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

from tasks.core.config import DataSection, RunConfig, TrainSection, fill_prompt
from tasks.core.lifeline import die_with_parent
from tasks.core.progress import LOG_EVERY_SECONDS, Reporter, run_logger
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import RemoteError, Store, stage_key
from tasks.core.tables import read_rows
from tasks.sd import device, text
from tasks.sd.models import ResolvedModel, hub_repo
from tasks.stages.shared_checkpoints import Uploads, fetch_checkpoints
from tasks.training.job import TrainJob, keyed_settings, resolved_optimizer
from tasks.training.launch import child_process

STAGE = "train"
EMBEDS = "text-embeds-items"
CODE_VERSION = 3  # 3: the trained weights in weights/ (the export stage writes what users load); records beside it
SUPPORTED = {("sd15", "full"), ("sdxl", "lora")}
TAIL_LINES = 40


@dataclass(frozen=True)
class TrainInputs:
    model: ResolvedModel
    latents: StageResult
    instance_prompt: str
    class_prompt: str | None
    prior_weight: float
    instances: StageResult | None = None  # preprocess: which image each instance latent is, for captions
    captions: dict[str, str] | None = None  # image path in the instance folder, no suffix -> its caption

    @classmethod
    def of(cls, config: RunConfig, model: ResolvedModel, latents: StageResult, instances: StageResult) -> TrainInputs:
        """The prompts filled in; the class prompt and its loss weight only with prior preservation; the sidecar
        captions when `data.captions` asks for them."""
        prior = config.prior.enabled
        captions = read_captions(config.data) if config.data.captions == "sidecar" else None
        return cls(model, latents, config.instance_prompt(), config.class_prompt() if prior else None,
                   config.prior.loss_weight if prior else 0.0, instances, captions)  # fmt: skip


def read_captions(data: DataSection) -> dict[str, str]:
    """Every `.txt` in the instance folder (subfolders included), filled in and keyed by its path without suffix, so
    `dog/a.txt` captions `dog/a.jpg`. An empty one captions nothing: its image keeps the instance prompt."""
    captions = {}
    for path in sorted(data.instance_dir.rglob("*.txt")):
        relative = path.relative_to(data.instance_dir)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        try:
            caption = " ".join(path.read_text(encoding="utf-8").split())
        except (UnicodeDecodeError, OSError) as err:
            why = "is not UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"cannot be read ({err.strerror})"
            raise StageError(STAGE, f"caption file {why}; fix or remove it", item=str(path)) from None
        if caption:
            captions[relative.with_suffix("").as_posix()] = fill_prompt(caption, data.token, data.class_name)
    return captions


def sample_captions(inputs: TrainInputs) -> tuple[dict[str, str], int]:
    """Each instance latent's caption by its sample id, and how many usable images have none."""
    if inputs.captions is None or inputs.instances is None:
        return {}, 0
    rows = [r for r in read_rows(inputs.instances.path / "items.csv", "preprocess", STAGE) if r["status"] == "ok"]
    found = {}
    for row in rows:
        caption = inputs.captions.get(Path(row["source"]).with_suffix("").as_posix())
        if caption is not None:
            found[Path(row["image"]).stem] = caption
    return found, len(rows) - len(found)


def _model_components(inputs: TrainInputs) -> list[str]:
    return ["unet", "scheduler", *text.text_components(inputs.model.family)]


def stage_key_for(cfg: TrainSection, inputs: TrainInputs) -> str:
    settings = keyed_settings(cfg)  # what this device can run: AdamW for 8-bit Adam and no TF32 without CUDA
    return stage_key(
        STAGE,
        CODE_VERSION,
        settings,
        latents=inputs.latents.key,  # a digest of its items' content, never of file names upstream
        instance_prompt=inputs.instance_prompt,
        class_prompt=inputs.class_prompt,
        prior_weight=inputs.prior_weight,
        model=inputs.model.identity(*_model_components(inputs)),
        # their text by the sample each captions (its image's content), not by their files' names
        **({"captions": sample_captions(inputs)[0]} if inputs.captions is not None else {}),
    )


def checkpoints_dir(store: Store, key: str) -> Path:
    """A stable place next to the entry, so a rerun of the same key finds the checkpoints."""
    return store.root / STAGE / f"{key}.checkpoints"


def _check_supported(cfg: TrainSection, inputs: TrainInputs) -> None:
    if (inputs.model.family, cfg.method) not in SUPPORTED:
        raise StageError(
            STAGE,
            f"train.method={cfg.method!r} is not supported for {inputs.model.family} models; "
            "use full for SD 1.5 and lora for SDXL",
        )
    if cfg.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise StageError(STAGE, "train.attention='xformers' but xformers is not installed; use train.attention=sdpa")
    if cfg.optimizer != resolved_optimizer(cfg):
        run_logger().warning("train.optimizer=adamw8bit needs CUDA and bitsandbytes; using AdamW instead")


def cache_text_embeddings(model: ResolvedModel, prompts: list[str], store: Store) -> dict[str, Path]:
    """Embeddings of each prompt from the frozen encoders, cached by prompt and encoder identity."""
    family = model.family
    identity = model.identity(*text.text_components(family))
    loaded: list = []

    def build(prompt: str):
        def write(folder: Path) -> dict[str, Any]:
            if not loaded:
                encoders = [device.loaded(e) for e in text.load_text_encoders(model.path, family)]
                loaded.append((text.load_tokenizers(model.path, family), encoders))
            tokenizers, encoders = loaded[0]
            with torch.no_grad():
                cond = text.encode(family, encoders, text.tokenize(tokenizers, prompt))
            tensors = {"hidden": cond.hidden[0].contiguous()}
            if cond.pooled is not None:
                tensors["pooled"] = cond.pooled[0].contiguous()
            save_file({k: v[None] for k, v in tensors.items()}, folder / "embeds.safetensors")
            return {"prompt": prompt}

        return write

    paths = {}
    for prompt in prompts:
        key = stage_key(EMBEDS, CODE_VERSION, {"prompt": prompt}, family=family, model=identity)
        paths[prompt] = store.get_or_create(EMBEDS, key, build(prompt)).path / "embeds.safetensors"
    return paths


def _events(proc: subprocess.Popen, tail: collections.deque) -> Iterator[dict[str, Any]]:
    """JSON events from the child; any other line goes to the log (and the tail kept for errors)."""
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue
        tail.append(line)
        try:
            event = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            event = None
        if event is None:
            run_logger().info("[train] %s", line)
        else:
            yield event


def launch(
    job_path: Path, cfg: TrainSection, on_checkpoint: Callable[[str], None] | None = None
) -> tuple[int, float | None]:
    """Run the child to the end, telling `on_checkpoint` the name of each checkpoint it writes whole; returns (steps
    restored, final loss)."""
    command, child_env = child_process(job_path, cfg)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **child_env}
    log, tail = run_logger(), collections.deque(maxlen=TAIL_LINES)
    restored, last_step, final_loss, error, logged = 0, 0, None, None, 0.0
    with (
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=die_with_parent()
        ) as proc,
        Reporter(cfg.steps, "train steps") as progress,
    ):
        for event in _events(proc, tail):
            if event.get("event") == "resume":
                restored = last_step = event["step"]
                progress.advance(restored)
                log.info("resuming from checkpoint %s (step %d of %d)", event["checkpoint"], restored, cfg.steps)
            elif event.get("event") == "step":
                last_step, final_loss = event["step"], event["loss"]
                progress.advance()
                if time.monotonic() - logged >= LOG_EVERY_SECONDS or last_step == cfg.steps:
                    # every step is in metrics.csv; a log line per step would keep the Prefect server busy
                    logged = time.monotonic()
                    log.info("step %d loss %.5f lr %.3g", last_step, final_loss, event["lr"])
            elif event.get("event") == "checkpoint" and on_checkpoint is not None:
                on_checkpoint(event["name"])
            elif event.get("event") == "error":
                error = event["message"]
        code = proc.wait()
    if code != 0:
        why = error or f"training process exited with code {code}; last output:\n" + "\n".join(tail)
        raise StageError(STAGE, why, item=f"step {last_step + 1}")
    return restored, final_loss


def make_job(
    cfg: TrainSection, inputs: TrainInputs, out_dir: Path, checkpoints: Path, embeds: dict[str, Path] | None
) -> TrainJob:
    """All the child needs: paths, settings (the thread count as resolved here, for the record), prompts (and captions)
    and the facts its model card states."""
    cfg = cfg.model_copy(update={"cpu_threads": device.cpu_threads(cfg.cpu_threads)})
    captions, uncaptioned = sample_captions(inputs)
    counted = {"captions": {"sidecar": len(captions), "instance prompt": uncaptioned}} if inputs.captions else {}
    return TrainJob(
        family=inputs.model.family,
        base=inputs.model.path,
        latents_dir=inputs.latents.path,
        out_dir=out_dir,
        checkpoints_dir=checkpoints,
        train=cfg,
        optimizer=resolved_optimizer(cfg),
        instance_prompt=inputs.instance_prompt,
        class_prompt=inputs.class_prompt,
        captions=captions,
        prior_weight=inputs.prior_weight,
        text_embeds=embeds,
        parent_pid=os.getpid(),
        facts={
            "base_model": inputs.model.id,
            "base_model_repo": hub_repo(inputs.model.id),
            "family": inputs.model.family,
            "instance_prompt": inputs.instance_prompt,
            **counted,
            "settings": {
                **cfg.model_dump(mode="json"),
                "class_prompt": inputs.class_prompt,
                "prior_loss_weight": inputs.prior_weight,
            },
        },
    )


def build(cfg: TrainSection, inputs: TrainInputs, store: Store, key: str) -> StageResult:
    """Train in the accelerate child; a rerun of a killed training resumes from its newest checkpoint."""
    _check_supported(cfg, inputs)
    kinds = set(pd.read_csv(inputs.latents.path / "index.csv")["kind"])
    if inputs.class_prompt and "class" not in kinds:
        raise StageError(STAGE, "prior preservation is on but the latents hold no class images", item="latents")
    counts: dict[str, Any] = {}

    def write(folder: Path) -> dict[str, Any]:
        ckpt = checkpoints_dir(store, key)
        ckpt.mkdir(parents=True, exist_ok=True)
        job = make_job(cfg, inputs, folder, ckpt, None)
        if not cfg.train_text_encoder:
            job = job.model_copy(update={"text_embeds": cache_text_embeddings(inputs.model, job.prompts(), store)})
        job_path = ckpt / "job.json"
        job_path.write_text(job.model_dump_json(indent=1))
        if store.remote is None:
            restored, final_loss = launch(job_path, cfg)
        else:  # a training killed on another machine resumes here
            fetch_checkpoints(store.remote, key, ckpt)
            uploads = Uploads(store.remote, key, ckpt)
            try:
                restored, final_loss = launch(job_path, cfg, uploads.add)
            finally:
                uploads.close()
        counts.update(restored=restored)
        return {"items": cfg.steps, "steps": cfg.steps, "restored_steps": restored, "final_loss": final_loss}

    entry = store.get_or_create(STAGE, key, write, keyed_settings(cfg))
    if entry.created:  # the entry holds the result (and its sample weights); resume state is gigabytes of dead weight
        shutil.rmtree(checkpoints_dir(store, key), ignore_errors=True)
        if store.remote is not None:
            try:
                store.remote.drop_checkpoints(key)
            except RemoteError as err:
                run_logger().warning("the checkpoints of train/%s stay in the shared store: %s", key, err.message)
    restored = counts.get("restored", 0)
    trained = cfg.steps - restored if entry.created else 0
    loaded = (f"unet + text encoders ({inputs.model.id})",) if entry.created else ()
    return StageResult(STAGE, key, entry.path, trained, cfg.steps - trained, models_loaded=loaded)


stage = Stage(STAGE, "train", stage_key_for, build, outputs={"loss_csv": "metrics.csv"})
run = stage.run  # the plain function: cached entry or build
