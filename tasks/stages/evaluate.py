"""Evaluate stage: the DreamBooth paper's scores per group of samples (fine-tuned, base, each checkpoint), and the
toy analyser's rates, in tables with their own key, so a change to the report's page never scores anything again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.config import EvaluateSection, RunConfig
from tasks.core.stage import Stage, StageResult, produced
from tasks.core.store import Store, stage_key
from tasks.core.tables import METRICS_FILE, Sample, group_label, read_rows, read_samples
from tasks.sd.device import device as accelerator
from tasks.sd.scoring import (
    CLIP,
    DINO,
    MetricsUnavailable,
    clip_text,
    image_embeddings,
    load_metric_model,
    mean_cosine,
    model_identity,
    open_rgb,
    text_embeddings,
    token_pattern,
)

STAGE = "evaluate"
CODE_VERSION = 1
MODEL_SETTINGS = ("clip_model", "dino_model")  # keyed by the models' identities, never by a folder path
SCORES = ("clip_t", "clip_i", "dino")


@dataclass(frozen=True)
class EvaluateInputs:
    """The instance images the samples are compared with, the samples, and the identifier token (CLIP never saw
    it, so CLIP-T drops it; the analyser scores the subject only where a prompt names it). `root`, the artifact root,
    only says where the metric models' file hashes are remembered: it is never part of the key."""

    preprocess: StageResult
    generate: StageResult
    token: str
    root: Path | None = None

    @classmethod
    def of(cls, config: RunConfig, preprocess: StageResult, generate: StageResult) -> EvaluateInputs:
        return cls(preprocess, generate, config.data.token, config.run.artifacts_root)


def analyser_version(name: str) -> int | None:
    if not name:
        return None
    from tasks.toy import score

    return score.VERSION


def stage_key_for(cfg: EvaluateSection, inputs: EvaluateInputs) -> str:
    """The samples (their stage's key), the instance images' bytes, the token and the scoring models' identities."""
    return stage_key(
        STAGE,
        CODE_VERSION,
        cfg.keyed(without=MODEL_SETTINGS),
        metric_models={
            "clip": model_identity(cfg.clip_model, inputs.root),
            "dino": model_identity(cfg.dino_model, inputs.root),
        },
        analyser_version=analyser_version(cfg.analyser),
        instance_images=sorted(produced(inputs.preprocess, "images").values()),  # their bytes, not their names
        generate=inputs.generate.key,
        token=inputs.token,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def analyser_scores(samples: list[Sample], token: str) -> list[dict[str, Any]]:
    """The toy analyser per group and prompt: the share of images that show the subject, and the share that show
    every colour, shape and background the prompt names."""
    from tasks.toy.score import matches, parse, read

    names_token = token_pattern(token)
    grouped: dict[tuple[str, int | None, str], list[Sample]] = {}
    for sample in samples:
        grouped.setdefault((*sample.group, sample.prompt), []).append(sample)
    rows = []
    for (kind, step, prompt), members in grouped.items():
        readings = [read(open_rgb(s.source)) for s in members]
        checks = [matches(r, parse(prompt)) for r in readings]
        rows.append(
            {
                "group": group_label(kind, step),
                "kind": kind,
                "step": step,
                "prompt": prompt,
                "token": bool(names_token.search(prompt)),
                "images": len(members),
                "subject": _mean([float(r.subject) for r in readings]),
                "words": _mean([float(c["all"]) for c in checks if c]),
            }
        )
    return rows


def score(
    cfg: EvaluateSection, samples: list[Sample], instance: list[Path], token: str
) -> tuple[dict[str, Any], list[str]]:
    """Each group's mean cosine similarities, as in the DreamBooth paper: CLIP-T (image vs its prompt), CLIP-I and
    DINO (image vs every instance image); the instance images against each other are the reference row. Returns
    them and the names of the models loaded; a missing model is a message, not an error."""
    device = accelerator()
    groups: dict[tuple[str, int | None], list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.group, []).append(sample)
    empty = dict.fromkeys(SCORES)
    rows = [
        {"group": group_label(kind, step), "kind": kind, "step": step, "images": len(members), **empty}
        for (kind, step), members in groups.items()
    ]
    reference = {"group": "instance images (reference)", "kind": "instance", "step": None, "images": len(instance)}
    reference.update(empty)
    missing, loaded = [], []
    for model, model_id in ((CLIP, cfg.clip_model), (DINO, cfg.dino_model)):
        try:
            network, processor = load_metric_model(model, model_id, device)
        except MetricsUnavailable as err:
            missing.append(str(err))
            continue
        loaded.append(model.name)
        vectors = image_embeddings(model, network, processor, instance + [s.source for s in samples], device)
        ref = [vectors[p] for p in instance]
        name = "clip_i" if model is CLIP else "dino"
        for row, members in zip(rows, groups.values(), strict=True):
            row[name] = mean_cosine([vectors[s.source] for s in members], ref)
        reference[name] = mean_cosine(ref, ref, skip_same=True)
        if model is CLIP:
            texts = text_embeddings(network, processor, [clip_text(s.prompt, token) for s in samples], device)
            for row, members in zip(rows, groups.values(), strict=True):
                pairs = [float(vectors[s.source] @ texts[clip_text(s.prompt, token)]) for s in members]
                row["clip_t"] = sum(pairs) / len(pairs)
    analysed = analyser_scores(samples, token) if cfg.analyser == "toy" else []
    for row in rows:
        prompts = [a for a in analysed if (a["kind"], a["step"]) == (row["kind"], row["step"]) and a["token"]]
        images = sum(a["images"] for a in prompts)
        row["subject"] = sum(a["subject"] * a["images"] for a in prompts) / images if images else None
    models = {"clip": cfg.clip_model, "dino": cfg.dino_model}
    rows = [*rows, reference | {"subject": None}] if instance else rows
    return {"rows": rows, "missing": missing, "models": models, "analyser": analysed}, loaded


def _writer(cfg: EvaluateSection, inputs: EvaluateInputs):
    """metrics.json (everything the report shows), metrics.csv (a row per group) and analyser.csv (a row per group
    and prompt, when the analyser ran)."""

    def build(folder: Path) -> dict[str, Any]:
        samples = read_samples(inputs.generate.path, STAGE)
        items = read_rows(inputs.preprocess.path / "items.csv", "preprocess", STAGE)
        instance = sorted(inputs.preprocess.path / row["image"] for row in items if row["status"] == "ok")  # by content
        metrics, loaded = score(cfg, samples, instance, inputs.token)
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=1, ensure_ascii=False), encoding="utf-8")
        pd.DataFrame(metrics["rows"]).to_csv(folder / "metrics.csv", index=False)
        if metrics["analyser"]:
            pd.DataFrame(metrics["analyser"]).to_csv(folder / "analyser.csv", index=False)
        return {"items": len(samples), "models_loaded": loaded}

    return build


def build(cfg: EvaluateSection, inputs: EvaluateInputs, store: Store, key: str) -> StageResult:
    """Score the samples; the scoring models load only here."""
    entry = store.get_or_create(STAGE, key, _writer(cfg, inputs), cfg.keyed())
    if not entry.created:  # another run wrote it while this one waited for the lock
        return StageResult.cached(entry)
    loaded = tuple(entry.info["models_loaded"])
    return StageResult(STAGE, key, entry.path, items_processed=entry.info["items"], models_loaded=loaded)


stage = Stage(STAGE, "evaluate", stage_key_for, build, outputs={"metrics_csv": "metrics.csv"})
run = stage.run  # the plain function: cached entry or build
