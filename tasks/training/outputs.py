"""What a training leaves: weights of sample steps (for checkpoint samples) and, at the end, the model folder (weights
and card, as uploaded to the hub) with the training's own records beside it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tasks.core.atomic import atomic_folder, link_or_copy
from tasks.core.faults import fault, kill_if_injected
from tasks.sd import export, text
from tasks.sd.layout import MODEL_DIR
from tasks.training.checkpoints import step_folders
from tasks.training.job import TrainJob


def save_sample_weights(job: TrainJob, step: int, unet, encoders) -> None:
    """Weights of step `step` for checkpoint samples, in the same format as the final output, kept beside the
    resume checkpoints (a stable place that survives a resume) and linked into the output at the end."""
    final = job.checkpoints_dir / "samples" / f"step-{step:06d}"
    if final.is_dir():
        return
    with atomic_folder(final) as folder:
        if job.train.method == "full":
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            if encoders:
                encoders[0].save_pretrained(folder / "text_encoder", safe_serialization=True)
        else:
            export.save_sdxl_lora(*lora_states(unet, encoders), folder)


def lora_states(unet, encoders) -> tuple[dict, dict | None, dict | None]:
    from peft.utils import get_peft_model_state_dict

    te_states = [get_peft_model_state_dict(e) for e in encoders] if encoders else [None, None]
    return get_peft_model_state_dict(unet), *te_states


def write_outputs(job: TrainJob, unet, encoders, params: dict, metrics: list[dict], processes: int) -> None:
    """The model folder (weights and card, as uploaded to the hub) and beside it the training's own records."""
    out, model = job.out_dir, job.out_dir / MODEL_DIR
    if dump := fault("save_trainable_to"):
        save_file({k: p.detach().contiguous() for k, p in params.items()}, Path(dump))
    if job.train.method == "full":
        text_encoder = encoders[0] if encoders else text.load_text_encoders(job.base, job.family)[0]
        facts = export.save_sd15_outputs(
            job.base, unet, text_encoder, model, job.safety_checker, job.vae_path, job.facts["base_model"]
        )
    else:
        facts = export.save_sdxl_lora(*lora_states(unet, encoders), model)
    kill_if_injected("train:mid-export", job.parent_pid)
    samples = step_folders(job.checkpoints_dir / "samples")
    for folder in samples:
        shutil.copytree(folder, out / "samples" / folder.name, copy_function=link_or_copy)
    cfg = job.train
    training = {"family": job.family, "method": cfg.method, "steps": cfg.steps,
                "sample_steps": [int(f.name.removeprefix("step-")) for f in samples],
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "num_processes": processes,
                "global_batch": cfg.batch_size * cfg.grad_accum * processes,
                **({"captions": job.facts["captions"]} if "captions" in job.facts else {})}  # fmt: skip
    (out / "training.json").write_text(json.dumps(training, indent=1))
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(metrics)
    final_loss = metrics[-1]["loss"] if metrics else None
    export.write_model_card(model, {**job.facts, **facts, "steps": job.train.steps, "final_loss": final_loss})
