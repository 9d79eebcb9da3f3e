"""What a training leaves: its weights (the final ones, and those of sample steps for checkpoint samples) and beside
them the training's own records. The formats users load are the export stage's."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tasks.core.atomic import atomic_folder, link_or_copy
from tasks.core.faults import fault, kill_if_injected
from tasks.sd.export import save_sdxl_lora
from tasks.sd.layout import WEIGHTS_DIR
from tasks.training.checkpoints import step_folders
from tasks.training.job import TrainJob
from tasks.training.process import emit


def save_weights(job: TrainJob, unet, encoders, folder: Path) -> dict:
    """The trained weights in float32: full: `unet/` (and `text_encoder/` when trained) as save_pretrained lays them
    out; lora: the LoRA files. What they are (LoRA modules per component, files), for the model card."""
    if job.train.method == "full":
        unet.register_to_config(_name_or_path=job.facts.get("base_model", job.base.name))  # never a folder here
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        if encoders:
            encoders[0].save_pretrained(folder / "text_encoder", safe_serialization=True)
        return {}
    return {"lora_modules": save_sdxl_lora(*lora_states(unet, encoders), folder)["lora_modules"]}


def save_sample_weights(job: TrainJob, step: int, unet, encoders) -> None:
    """Weights of step `step` for checkpoint samples, in the same layout as the final ones, kept beside the resume
    checkpoints (a stable place that survives a resume) and linked into the output at the end."""
    final = job.checkpoints_dir / "samples" / f"step-{step:06d}"
    if final.is_dir():
        return
    with atomic_folder(final) as folder:
        save_weights(job, unet, encoders, folder)
    emit("checkpoint", name=f"samples/{final.name}")


def lora_states(unet, encoders) -> tuple[dict, dict | None, dict | None]:
    from peft.utils import get_peft_model_state_dict

    te_states = [get_peft_model_state_dict(e) for e in encoders] if encoders else [None, None]
    return get_peft_model_state_dict(unet), *te_states


def write_outputs(job: TrainJob, unet, encoders, params: dict, metrics: list[dict], processes: int) -> None:
    """The final weights and beside them the training's records: training.json (with the facts the model card
    states) and metrics.csv."""
    out = job.out_dir
    if dump := fault("save_trainable_to"):
        save_file({k: p.detach().contiguous() for k, p in params.items()}, Path(dump))
    weights = save_weights(job, unet, encoders, out / WEIGHTS_DIR)
    kill_if_injected("train:mid-export", job.parent_pid)
    samples = step_folders(job.checkpoints_dir / "samples")
    for folder in samples:
        shutil.copytree(folder, out / "samples" / folder.name, copy_function=link_or_copy)
    cfg = job.train
    final_loss = metrics[-1]["loss"] if metrics else None
    training = {"family": job.family, "method": cfg.method, "steps": cfg.steps,
                "sample_steps": [int(f.name.removeprefix("step-")) for f in samples],
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "num_processes": processes,
                "global_batch": cfg.batch_size * cfg.grad_accum * processes,
                **({"captions": job.facts["captions"]} if "captions" in job.facts else {}),
                "final_loss": final_loss, "card": {**job.facts, **weights}}  # fmt: skip
    (out / "training.json").write_text(json.dumps(training, indent=1))
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(metrics)
