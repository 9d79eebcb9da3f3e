"""Select stage: the weights a run keeps when `train.pick` is `best:<metric>`: every kept step and the final weights,
scored on the same validation prompts x seeds, and the best exported in the train stage's formats.

Generate then renders from this entry as it would from the train entry; the train entry keeps every step's weights
(removing them is `cache gc`'s job, never a silent delete).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from tasks.core.atomic import link_or_copy
from tasks.core.config import RunConfig, TrainSection
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import Store, stage_key
from tasks.core.tables import METRICS_FILE
from tasks.sd.layout import MODEL_DIR
from tasks.sd.models import ResolvedModel

STAGE = "select"
CODE_VERSION = 1
SELECTION_FILE = "selection.json"


@dataclass(frozen=True)
class SelectInputs:
    """The base model, the training with its kept steps, and the evaluate stage's scores of their validation renders."""

    model: ResolvedModel
    train: StageResult
    scores: StageResult
    safety_checker: bool

    @classmethod
    def of(cls, config: RunConfig, model: ResolvedModel, train: StageResult, scores: StageResult) -> SelectInputs:
        return cls(model, train, scores, config.model.safety_checker)


def stage_key_for(cfg: TrainSection, inputs: SelectInputs) -> str:
    return stage_key(STAGE, CODE_VERSION, {"pick": cfg.pick}, train=inputs.train.key, scores=inputs.scores.key)


def candidate_scores(metrics: dict[str, Any], metric: str) -> dict[int, float]:
    """Each candidate's score by its step: the group's mean, or for `analyser` the share of images of prompts that
    name the identifier which show the subject."""
    kinds = ("checkpoint", "finetuned")
    if metric != "analyser":
        return {r["step"]: r[metric] for r in metrics["rows"] if r["kind"] in kinds and r[metric] is not None}
    counts: dict[int, list[float]] = {}
    for row in metrics.get("analyser", []):
        if row["kind"] in kinds and row["token"]:
            hits, images = counts.setdefault(row["step"], [0.0, 0.0])
            counts[row["step"]] = [hits + row["subject"] * row["images"], images + row["images"]]
    return {step: hits / images for step, (hits, images) in counts.items() if images}


def best_step(scores: dict[int, float]) -> int:
    """The highest score; between equal scores, the later step (more training for the same result)."""
    return max(scores, key=lambda step: (scores[step], step))


def _export(inputs: SelectInputs, step: int, training: dict[str, Any], out: Path) -> None:
    """The picked weights in the train stage's output formats: the final model as it is (linked), a kept step's
    UNet and text encoder as a full pipeline (sd15), or its LoRA files (sdxl)."""
    if step == training["steps"]:
        shutil.copytree(inputs.train.path / MODEL_DIR, out, copy_function=link_or_copy)
        return
    kept = inputs.train.path / "samples" / f"step-{step:06d}"
    if training["method"] == "lora":
        shutil.copytree(kept, out, copy_function=link_or_copy)
        return
    from diffusers import UNet2DConditionModel  # diffusers' pipelines take seconds to import: only when exporting
    from transformers import CLIPTextModel

    from tasks.sd import export

    encoder = kept / "text_encoder" if (kept / "text_encoder").is_dir() else inputs.model.path / "text_encoder"
    export.save_sd15_outputs(
        inputs.model.path,
        UNet2DConditionModel.from_pretrained(kept / "unet"),
        CLIPTextModel.from_pretrained(encoder),
        out,
        inputs.safety_checker,
        inputs.model.vae_path,
        inputs.model.id,
    )


def _card(inputs: SelectInputs, out: Path, selection: dict[str, Any]) -> None:
    """The train stage's model card, with the pick stated (a new file: the copied one is a link into train's)."""
    card = ModelCard.load(inputs.train.path / MODEL_DIR / "README.md")
    card.text += (f"\n\n## Picked weights\n\nThese are the weights of step {selection['step']} of "
                  f"{selection['last_step']}, picked by {selection['metric']}: {selection['value']:.4f} "
                  f"(the last step: {selection['last_value']:.4f}).\n")  # fmt: skip
    (out / "README.md").unlink(missing_ok=True)
    card.save(out / "README.md")


def build(cfg: TrainSection, inputs: SelectInputs, store: Store, key: str) -> StageResult:
    """Pick, export, and record every candidate's score; training.json says the picked step and no kept steps, so
    generate renders the final prompts from the pick alone."""
    metric = cfg.pick.removeprefix("best:")
    training = json.loads((inputs.train.path / "training.json").read_text())
    metrics = json.loads((inputs.scores.path / METRICS_FILE).read_text())
    scores = candidate_scores(metrics, metric)
    if training["steps"] not in scores:
        raise StageError(STAGE, f"no {metric} scores for the final weights; set the model or analyser the metric "
                         "needs (evaluate.clip_model, evaluate.dino_model or evaluate.analyser)")  # fmt: skip
    step = best_step(scores)
    selection = {"metric": metric, "step": step, "value": scores[step], "last_step": training["steps"],
                 "last_value": scores[training["steps"]], "candidates": scores}  # fmt: skip

    def write(folder: Path) -> dict[str, Any]:
        _export(inputs, step, training, folder / MODEL_DIR)
        _card(inputs, folder / MODEL_DIR, selection)
        picked = {**training, "steps": step, "sample_steps": [], "picked_from": inputs.train.key}
        (folder / "training.json").write_text(json.dumps(picked, indent=1))
        link_or_copy(inputs.train.path / "metrics.csv", folder / "metrics.csv")  # the loss, where model_dir's is
        (folder / SELECTION_FILE).write_text(json.dumps(selection, indent=1))
        return {"items": 1, "step": step}

    entry = store.get_or_create(STAGE, key, write, {"pick": cfg.pick})
    if not entry.created:
        return StageResult.cached(entry)
    exported = step != training["steps"] and training["method"] == "full"  # a pipeline saved from a step's weights
    return StageResult(STAGE, key, entry.path, items_processed=1, models_loaded=(f"step {step}",) if exported else ())


stage = Stage(STAGE, "train", stage_key_for, build, outputs={"model_dir": MODEL_DIR})
run = stage.run  # the plain function: cached entry or built
