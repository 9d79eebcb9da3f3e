"""Export stage: what users load, written from the weights a train (or select) entry keeps, with its model card.

Its own stage so the formats are settings of their own: changing `export.dtype`, the single file or the kohya file
writes the export again and never retrains. Components training left as they were are linked from the base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import ExportSection, RunConfig
from tasks.core.progress import Reporter
from tasks.core.stage import Stage, StageError, StageResult
from tasks.core.store import Store, stage_key
from tasks.core.tables import read_json
from tasks.sd.layout import MODEL_DIR, SELECTION_FILE, WEIGHTS_DIR
from tasks.sd.models import ResolvedModel

STAGE = "export"
CODE_VERSION = 1


@dataclass(frozen=True)
class ExportInputs:
    """The base model (its components go into a full fine-tune's pipeline), the entry holding the weights (train, or
    select with a best pick) and whether the base's safety checker stays."""

    model: ResolvedModel
    weights: StageResult
    safety_checker: bool

    @classmethod
    def of(cls, config: RunConfig, model: ResolvedModel, weights: StageResult) -> ExportInputs:
        return cls(model, weights, config.model.safety_checker)


def stage_key_for(cfg: ExportSection, inputs: ExportInputs) -> str:
    return stage_key(
        STAGE,
        CODE_VERSION,
        cfg.keyed(),
        weights=inputs.weights.key,
        safety_checker=inputs.safety_checker,
        model=inputs.model.identities,
    )


def _picked_text(selection: dict[str, Any]) -> str:
    return (f"\n\n## Picked weights\n\nThese are the weights of step {selection['step']} of {selection['last_step']}, "
            f"picked by {selection['metric']}: {selection['value']:.4f} (the last step: "
            f"{selection['last_value']:.4f}).\n")  # fmt: skip


def write_card(model_dir: Path, training: dict[str, Any], formats: dict[str, Any], cfg: ExportSection,
               selection: dict[str, Any] | None) -> None:  # fmt: skip
    """README.md: the training's facts (training.json), the export's (dtype, files) and, for a pick, which step."""
    from huggingface_hub import ModelCard

    from tasks.sd.card import write_model_card

    card = training.get("card") or {}
    settings = {**(card.get("settings") or {}), **{f"export.{k}": v for k, v in cfg.model_dump(mode="json").items()}}
    write_model_card(model_dir, {**card, **formats, "settings": settings, "steps": training["steps"],
                                 "final_loss": training.get("final_loss")})  # fmt: skip
    if selection is not None:
        written = ModelCard.load(model_dir / "README.md")
        written.text += _picked_text(selection)
        written.save(model_dir / "README.md")


def build(cfg: ExportSection, inputs: ExportInputs, store: Store, key: str) -> StageResult:
    """The formats `cfg` asks for, in `cfg.dtype`: sd15 the diffusers folder (+ single file), sdxl the LoRA files."""
    training = read_json(inputs.weights.path / "training.json", inputs.weights.stage, STAGE)
    picked = inputs.weights.path / SELECTION_FILE
    selection = read_json(picked, inputs.weights.stage, STAGE) if picked.is_file() else None
    weights = inputs.weights.path / WEIGHTS_DIR
    if not weights.is_dir():
        raise StageError(STAGE, "the entry holds no trained weights; rerun the train stage", item=str(weights))

    def write(folder: Path) -> dict[str, Any]:
        from tasks.sd import export  # diffusers' pipelines take seconds to import: only when exporting

        model, base = folder / MODEL_DIR, inputs.model
        if training["method"] == "full":
            _, parts, _ = export.sd15_sources(base.path, weights, inputs.safety_checker, base.vae_path)
            with Reporter(len(parts) + cfg.single_file, "export") as progress:
                formats = export.export_sd15(base.path, weights, model, cfg.dtype, cfg.single_file,
                                             inputs.safety_checker, base.vae_path, base.id,
                                             lambda part: progress.advance())  # fmt: skip
        else:
            formats = export.export_lora(weights, model, cfg.dtype, cfg.kohya)
        write_card(model, training, formats, cfg, selection)
        (folder / "export.json").write_text(json.dumps(formats, indent=1))
        loaded.extend(_loaded(formats))
        return {"items": 1}

    loaded: list[str] = []
    entry = store.get_or_create(STAGE, key, write, cfg.keyed())
    if not entry.created:
        return StageResult.cached(entry)
    return StageResult(STAGE, key, entry.path, 1, models_loaded=tuple(loaded))


def _loaded(formats: dict[str, Any]) -> list[str]:
    """What the export loaded: components it cast (the others are linked), and the single file's three."""
    cast = [name.rstrip("/") for name in formats["files"] if name.endswith("/")]
    cast = [name for name in cast if name not in formats.get("linked", cast)]
    found = [f"{', '.join(cast)} in {formats['dtype']}"] if cast else []
    return found + (["unet, vae, text_encoder for the single file"] if "ldm_tensors" in formats else [])


stage = Stage(STAGE, "export", stage_key_for, build, outputs={"model_dir": MODEL_DIR})
run = stage.run  # the plain function: cached entry or built
