"""Picking the kept weights by a metric, on toy-sd: the step picked on one set of seeds holds up on held-out seeds,
and the exported model is that step's weights."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from tasks.core.config import ExportSection, TrainSection
from tasks.core.stage import StageResult
from tasks.core.store import Store
from tasks.core.tables import METRICS_FILE
from tasks.sd.layout import MODEL_DIR, SELECTION_FILE, WEIGHTS_DIR
from tasks.sd.models import resolve
from tasks.stages import export, select
from tasks.stages.select import candidate_scores

STEPS = ("100", "200", "300", "400")
# About one standard error of the difference of two shares near 30% of 16 images each: an earlier step must show the
# subject in three images more than the final weights to be kept instead.
MARGIN = 0.15


def _run(boothflow, root: Path, seeds: list[int], summary: Path) -> dict:
    boothflow("run", "--config", "toy", "--artifacts", root, "--summary", summary,
              "--set", "train.sample_every=100", "--set", "train.checkpoint_every=0",
              "--set", "train.pick='best:analyser'", "--set", f"train.pick_margin={MARGIN}",
              "--set", f"generate.validation_seeds={seeds}",
              "--set", "generate.prompts=['a photo of {token} {class}']", "--set", "generate.seeds=2")  # fmt: skip
    return json.loads(summary.read_text())


def _tensors(folder: Path) -> dict:
    return {f"{part}.{name}": tensor for part in ("unet", "text_encoder")
            for name, tensor in load_file(next((folder / part).glob("*.safetensors"))).items()}  # fmt: skip


def test_a_best_pick_with_a_margin_holds_on_held_out_seeds_and_exports_that_steps_weights(
    boothflow, toy_root: Path, tmp_path: Path
) -> None:
    root = toy_root  # shared with the toy DreamBooth test: its training too (the pick is not keyed in train)
    first = _run(boothflow, root, list(range(16)), tmp_path / "a.json")  # seeds A: the pick
    assert list(first["stages"])[3:9] == ["train", "validate", "score", "select", "export", "generate"]
    selected = root / "select" / first["stages"]["select"]["key"]
    picked = json.loads((selected / SELECTION_FILE).read_text())
    assert sorted(picked["candidates"]) == list(STEPS) and picked["last_step"] == 400
    step, best = picked["step"], max(picked["candidates"].values())
    assert picked["margin"] == MARGIN and (step != 400) == (best > picked["last_value"] + MARGIN)
    assert picked["value"] == (best if step != 400 else picked["last_value"])

    held_out = _run(boothflow, root, list(range(100, 116)), tmp_path / "b.json")  # seeds B: the check
    assert held_out["stages"]["train"]["status"] == "cached" and held_out["stages"]["validate"]["status"] == "ran"
    scores = root / "evaluate" / held_out["stages"]["score"]["key"] / METRICS_FILE
    on_b = candidate_scores(json.loads(scores.read_text()), "analyser")
    print(f"picked step {step} on seeds A: {picked['candidates']}; on seeds B: {on_b}")
    assert on_b[step] >= max(on_b.values()) - MARGIN, (step, picked["candidates"], on_b)

    train = root / "train" / first["stages"]["train"]["key"]
    kept = train / WEIGHTS_DIR if step == 400 else train / "samples" / f"step-{step:06d}"
    exported, original = _tensors(Path(first["outputs"]["model_dir"])), _tensors(kept)
    assert exported.keys() == original.keys() and len(exported) > 100
    assert all(exported[name].equal(original[name]) for name in original)  # that step's weights, bit for bit
    page = Path(first["outputs"]["report_html"]).read_text()
    assert f"step {step} of 400 by analyser" in page
    assert "rendered and scored by the validate and score stages" in page  # the checkpoints section says where

    # A step before the last, picked by scores that favour it: its kept weights, exported into a pipeline that
    # diffusers loads, with a card that says so.
    scores = tmp_path / "scores"
    scores.mkdir()
    favour = {100: 0.25, 200: 0.5, 300: 0.9, 400: 0.75}
    rows = [{"kind": "finetuned" if s == 400 else "checkpoint", "step": s, "token": True, "subject": v, "images": 16}
            for s, v in favour.items()]  # fmt: skip
    (scores / METRICS_FILE).write_text(json.dumps({"rows": [], "analyser": rows}))
    inputs = select.SelectInputs(StageResult("train", train.name, train), StageResult("evaluate", "scores", scores))
    cfg = TrainSection(pick="best:analyser", sample_every=100)
    elsewhere = Store(tmp_path / "elsewhere")
    made = select.run(cfg, inputs, elsewhere)
    assert json.loads((made.path / SELECTION_FILE).read_text())["step"] == 300
    margin = TrainSection(pick="best:analyser", sample_every=100, pick_margin=0.15)
    within_margin = select.run(margin, inputs, elsewhere)
    assert json.loads((within_margin.path / SELECTION_FILE).read_text())["step"] == 400  # 0.9 is not over 0.75 + 0.15
    model_dir = export.run(ExportSection(), export.ExportInputs(resolve("toy-sd", "", root), made, False),
                           elsewhere).path / MODEL_DIR  # fmt: skip
    exported = _tensors(model_dir)
    original = _tensors(train / "samples" / "step-000300")
    assert exported.keys() == original.keys() and all(exported[n].equal(original[n]) for n in original)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    assert pipe.unet.state_dict()["conv_in.weight"].equal(original["unet.conv_in.weight"])
    text = ModelCard.load(model_dir / "README.md").text
    assert "step 300 of 400, picked by analyser: 0.9000 (the last step: 0.7500)" in text
