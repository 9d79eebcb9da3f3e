"""Select stage: the weights a run keeps when `train.pick` is `best:<metric>`: every kept step and the final weights,
scored on the same validation prompts x seeds, and the best linked into this entry in the train entry's layout.

Export and generate then read this entry as they would the train entry; the train entry keeps every step's weights
(removing them is `cache gc`'s job, never a silent delete).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.atomic import link_or_copy
from tasks.core.config import TrainSection
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import Store, stage_key
from tasks.core.tables import METRICS_FILE, read_json
from tasks.sd.layout import SELECTION_FILE, WEIGHTS_DIR

STAGE = "select"
CODE_VERSION = 2  # 2: the picked weights in weights/, for the export stage


@dataclass(frozen=True)
class SelectInputs:
    """The training with its kept steps, and the evaluate stage's scores of their validation renders."""

    train: StageResult
    scores: StageResult


def stage_key_for(cfg: TrainSection, inputs: SelectInputs) -> str:
    settings = {"pick": cfg.pick, "pick_margin": cfg.pick_margin}
    return stage_key(STAGE, CODE_VERSION, settings, train=inputs.train.key, scores=inputs.scores.key)


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


def best_step(scores: dict[int, float], last: int, margin: float) -> int:
    """The highest score if it beats the final weights' by more than `margin`, else the final weights; between equal
    scores, the later step (more training for the same result)."""
    best = max(scores, key=lambda step: (scores[step], step))
    return best if scores[best] > scores[last] + margin else last


def build(cfg: TrainSection, inputs: SelectInputs, store: Store, key: str) -> StageResult:
    """Pick, link the picked weights, and record every candidate's score; training.json says the picked step and no
    kept steps, so generate renders the final prompts from the pick alone."""
    metric = cfg.pick.removeprefix("best:")
    training = read_json(inputs.train.path / "training.json", "train", STAGE)
    metrics = read_json(inputs.scores.path / METRICS_FILE, inputs.scores.stage, STAGE)
    scores = candidate_scores(metrics, metric)
    if training["steps"] not in scores:
        raise StageError(STAGE, f"no {metric} scores for the final weights; set the model or analyser the metric "
                         "needs (evaluate.clip_model, evaluate.dino_model or evaluate.analyser)")  # fmt: skip
    step = best_step(scores, training["steps"], cfg.pick_margin)
    selection = {"metric": metric, "step": step, "value": scores[step], "last_step": training["steps"],
                 "last_value": scores[training["steps"]], "margin": cfg.pick_margin, "candidates": scores}  # fmt: skip

    def write(folder: Path) -> dict[str, Any]:
        kept = WEIGHTS_DIR if step == training["steps"] else Path("samples") / f"step-{step:06d}"
        shutil.copytree(inputs.train.path / kept, folder / WEIGHTS_DIR, copy_function=link_or_copy)
        picked = {**training, "steps": step, "sample_steps": [], "picked_from": inputs.train.key}
        (folder / "training.json").write_text(json.dumps(picked, indent=1))
        link_or_copy(inputs.train.path / "metrics.csv", folder / "metrics.csv")  # the loss beside the weights
        (folder / SELECTION_FILE).write_text(json.dumps(selection, indent=1))
        return {"items": 1, "step": step}

    entry = store.get_or_create(STAGE, key, write, {"pick": cfg.pick, "pick_margin": cfg.pick_margin})
    return StageResult(STAGE, key, entry.path, items_processed=1) if entry.created else StageResult.cached(entry)


stage = Stage(STAGE, "train", stage_key_for, build)
run = stage.run  # the plain function: cached entry or built
