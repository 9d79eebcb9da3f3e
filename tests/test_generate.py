"""The generate stage on real train outputs: images cached per weights, prompt and seed; batch-independent pixels."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

from tasks.core.config import ExportSection, GenerateSection, LatentsSection, PreprocessSection, TrainSection
from tasks.core.stage import StageError, StageResult
from tasks.core.store import Store
from tasks.sd import render
from tasks.sd.layout import MODEL_DIR, WEIGHTS_DIR
from tasks.sd.models import ResolvedModel, resolve
from tasks.sd.render import RenderRequest
from tasks.stages import export, generate, latents, preprocess, train
from tasks.stages.generate import GenerateInputs

TOKEN, CLASS = "sks", "toy"
SUBJECT = "a photo of {token} {class}"
BEACH = "a {class} on the beach"
FAST = {"steps": 2, "validation_prompts": ()}


def _instance_images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 72 + 8 * i, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _trained(root: Path, model_id: str, cfg: TrainSection) -> tuple[ResolvedModel, StageResult]:
    """The real preprocess -> latents -> train chain at 64 px, a few steps: what generate gets in a run."""
    store, images = Store(root), _instance_images(root / "images")
    model = resolve(model_id, "", root)
    files = preprocess.scan(images)
    pre = preprocess.run(
        PreprocessSection(resolution=64, min_side=64), preprocess.PreprocessInputs(images, files, 1), store
    )
    lat = latents.run(LatentsSection(), latents.LatentsInputs(model, pre, None), store)
    inputs = train.TrainInputs(model, lat, "a photo of sks toy", None, 0.0)
    return model, train.run(cfg, inputs, store)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResolvedModel, StageResult]:
    cfg = TrainSection(steps=4, checkpoint_every=0, sample_every=1, learning_rate=1e-3)
    return _trained(tmp_path_factory.mktemp("sd15"), "tiny-sd15", cfg)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResolvedModel, StageResult]:
    cfg = TrainSection(
        method="lora", train_text_encoder=False, steps=4, checkpoint_every=0, sample_every=2, learning_rate=1e-3
    )
    return _trained(tmp_path_factory.mktemp("sdxl"), "tiny-sdxl", cfg)


def _run(store: Store, trained: tuple[ResolvedModel, StageResult], **settings) -> StageResult:
    model, trained_result = trained
    cfg = GenerateSection(**{**FAST, **settings})
    return generate.run(cfg, GenerateInputs(model, trained_result, TOKEN, CLASS, 64), store)


def _samples(result: StageResult) -> pd.DataFrame:
    return pd.read_csv(result.path / "samples.csv", keep_default_na=False)


def _files(result: StageResult) -> dict[tuple[str, int, str, int], bytes]:
    """Each image's PNG bytes by (kind, step, prompt, seed)."""
    return {
        (r.kind, r.step, r.prompt, r.seed): (result.path / r.image).read_bytes() for r in _samples(result).itertuples()
    }


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


def _differ(a: bytes, b: bytes) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


def _spy_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every pipeline call the renderer makes."""
    sizes: list[int] = []
    original = render._render_batch

    def spy(pipe, batch):
        sizes.append(len(batch))
        return original(pipe, batch)

    monkeypatch.setattr(render, "_render_batch", spy)
    return sizes


def _broken(trained: tuple[ResolvedModel, StageResult], folder: Path) -> tuple[ResolvedModel, StageResult]:
    """The same train key over a copy whose UNet weights cannot be loaded: any load of them fails loudly."""
    model, result = trained
    copy = shutil.copytree(result.path, folder)
    weights = copy / WEIGHTS_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return model, replace(result, path=copy)


def test_an_image_does_not_depend_on_the_batch_it_was_rendered_in(
    sd15: tuple[ResolvedModel, StageResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = _spy_batches(monkeypatch)
    settings = {"prompts": (SUBJECT,), "seeds": (0, 1, 2, 3)}
    alone = _run(Store(tmp_path / "one"), sd15, batch_size=1, **settings)
    assert sizes == [1, 1, 1, 1]
    batched = _run(Store(tmp_path / "four"), sd15, batch_size=4, **settings)
    assert sizes == [1, 1, 1, 1, 4]
    assert alone.key == batched.key and alone.items_processed == batched.items_processed == 4
    one, four = _files(alone), _files(batched)
    assert one.keys() == four.keys() and len(one) == 4
    assert max(int(np.abs(_pixels(one[k]) - _pixels(four[k])).max()) for k in one) <= 1
    assert min(_differ(a, b) for i, a in enumerate(one.values()) for b in list(one.values())[i + 1 :]) > 5  # 4 seeds


def test_rerun_and_changed_prompts_render_only_missing_images(
    sd15: tuple[ResolvedModel, StageResult], tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    broken = _broken(sd15, tmp_path / "broken")
    first = _run(store, sd15, prompts=(SUBJECT, BEACH), seeds=(0, 1))
    assert (first.items_processed, first.items_cached, first.status) == (4, 0, "ran")
    assert first.models_loaded == ("base pipeline: tiny-sd15", "weights: finetuned")  # the base wears the fine-tune

    # Same train key over unloadable weights: a rerun that loaded anything would fail.
    again = _run(store, broken, prompts=(SUBJECT, BEACH), seeds=(0, 1))
    assert (again.items_processed, again.items_cached, again.status, again.models_loaded) == (0, 4, "cached", ())
    reordered = _run(store, broken, prompts=(BEACH, SUBJECT), seeds=(1, 0))  # new list, same images
    assert (reordered.items_processed, reordered.items_cached, reordered.models_loaded) == (0, 4, ())
    assert reordered.key != first.key and _files(reordered) == _files(first)

    changed = _run(store, sd15, prompts=(SUBJECT, "a {class} in the snow"), seeds=(0, 1))
    assert (changed.items_processed, changed.items_cached, changed.models_loaded) == (2, 2, first.models_loaded)
    before, after = _files(first), _files(changed)
    kept = [k for k in before if k[2] == "a photo of sks toy"]
    assert len(kept) == 2 and all(after[k] == before[k] for k in kept)
    assert {k[2] for k in after} == {"a photo of sks toy", "a toy in the snow"}

    with_base = _run(store, sd15, prompts=(SUBJECT, "a {class} in the snow"), seeds=(0, 1), compare_base=True)
    assert (with_base.items_processed, with_base.items_cached) == (4, 4)
    assert with_base.models_loaded == ("base pipeline: tiny-sd15",)
    images = _files(with_base)
    base = {k: v for k, v in images.items() if k[0] == "base"}
    assert {k[1] for k in base} == {0} and len(base) == 4
    assert min(_differ(png, images[("finetuned", 4, *k[2:])]) for k, png in base.items()) > 2
    assert all(images[k] == after[k] for k in after)

    cached = _run(store, broken, prompts=(SUBJECT, "a {class} in the snow"), seeds=(0, 1), compare_base=True)
    assert (cached.status, cached.models_loaded) == ("cached", ())
    one_new = _run(store, sd15, prompts=(SUBJECT, BEACH), seeds=(0, 1), compare_base=True)
    assert (one_new.items_processed, one_new.items_cached, one_new.models_loaded) == (2, 6, with_base.models_loaded)


def test_checkpoint_samples_come_from_each_sample_step(sd15: tuple[ResolvedModel, StageResult], tmp_path: Path) -> None:
    training = json.loads((sd15[1].path / "training.json").read_text())
    assert training["sample_steps"] == [1, 2, 3] and training["steps"] == 4
    result = _run(
        Store(tmp_path / "artifacts"),
        sd15,
        prompts=(SUBJECT,),
        seeds=(5, 6),
        validation_prompts=(SUBJECT, BEACH),
    )
    swaps = ("weights: step-1", "weights: step-2", "weights: step-3", "weights: finetuned")
    assert result.models_loaded == ("base pipeline: tiny-sd15", *swaps)  # one base pipeline wears every set in turn
    assert result.items_processed == 2 + 3 * 2  # every prompt x seed, then validation prompts x first seed per step
    table = _samples(result)
    checkpoints = table[table["kind"] == "checkpoint"]
    assert sorted(set(checkpoints["step"])) == training["sample_steps"]
    assert set(checkpoints["seed"]) == {5}
    more = _run(Store(tmp_path / "artifacts"), sd15, prompts=(SUBJECT,), seeds=(5, 6),
                validation_prompts=(SUBJECT, BEACH), validation_seeds=3)  # fmt: skip
    assert (more.items_processed, more.items_cached) == (3 * 2 * 3, 2)  # seeds 0-2 at every step; the final's cached
    extra = _samples(more)
    at_steps = extra[extra["kind"] == "checkpoint"]
    seeds_at = {step: sorted(set(group["seed"])) for step, group in at_steps.groupby("step")}
    assert seeds_at == {step: [0, 1, 2] for step in training["sample_steps"]}
    assert len(at_steps) == 3 * 2 * 3

    images = _files(result)
    final = images[("finetuned", 4, "a photo of sks toy", 5)]
    steps = [images[("checkpoint", s, "a photo of sks toy", 5)] for s in training["sample_steps"]]
    assert min(_differ(png, final) for png in steps) > 1
    assert min(_differ(a, b) for i, a in enumerate(steps) for b in steps[i + 1 :]) > 1


def _loaded_alone(model: ResolvedModel, trained: StageResult, kind: str, step: int, store: Store) -> DiffusionPipeline:
    """One set of weights loaded from scratch, as diffusers users load it: the exported pipeline folder or LoRA, or
    the base pipeline with the sample step's LoRA or UNet and text encoder on top; the base alone."""
    training = json.loads((trained.path / "training.json").read_text())
    exported = export.run(ExportSection(), export.ExportInputs(model, trained, False), store).path / MODEL_DIR
    folder = exported if kind == "finetuned" else trained.path / f"samples/step-{step:06d}"
    if kind == "finetuned" and training["method"] == "full":
        return StableDiffusionPipeline.from_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(model.path)
    if kind == "base":
        return pipe
    if training["method"] == "lora":
        pipe.load_lora_weights(folder)
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        pipe.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    return pipe


@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_one_base_pipeline_renders_what_each_set_of_weights_loaded_alone_renders(
    preset: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model, trained = trained_pair = request.getfixturevalue(preset)
    settings = {"prompts": (SUBJECT,), "seeds": (0, 1), "compare_base": True, "validation_prompts": (SUBJECT,)}
    result = _run(Store(tmp_path / "artifacts"), trained_pair, **settings)
    steps = json.loads((trained.path / "training.json").read_text())["sample_steps"]
    swaps = [f"weights: step-{s}" for s in steps]
    assert result.models_loaded == (f"base pipeline: tiny-{preset}", *swaps, "weights: finetuned")

    cfg, table = GenerateSection(**{**FAST, **settings}), _samples(result)
    assert len(table) == 2 + len(steps) + 2
    for (kind, step), rows in table.groupby(["kind", "step"], sort=False):
        loaded = _loaded_alone(model, trained, kind, step, Store(tmp_path / "exports"))
        pipe = render.prepare(loaded, cfg.vae_slicing, cfg.vae_tiling)
        render.make_scheduler(pipe, cfg.scheduler)
        requests = [RenderRequest(r.prompt, "", r.seed, cfg.steps, cfg.guidance, 64, 64) for r in rows.itertuples()]
        alone = [np.asarray(image) for _, image in render.render(pipe, requests, cfg.batch_size, "reference")]
        shared = [np.asarray(Image.open(result.path / image)) for image in rows["image"]]
        assert all(np.array_equal(a, b) for a, b in zip(alone, shared, strict=True)), (kind, step)


def test_png_text_and_samples_csv_describe_every_image(sd15: tuple[ResolvedModel, StageResult], tmp_path: Path) -> None:
    model, trained = sd15
    result = _run(
        Store(tmp_path / "artifacts"),
        sd15,
        prompts=(SUBJECT, BEACH),
        seeds=(3,),
        compare_base=True,
        validation_prompts=(SUBJECT,),
        negative_prompt="blurry",
        scheduler="EulerDiscreteScheduler",
        guidance=5.0,
        size=72,
    )
    table = _samples(result)
    assert list(table.columns) == ["id", "kind", "step", "template", "prompt", "seed", "model", "image"]
    assert len(table) == 2 + 3 + 2 == result.items_processed
    assert table["id"].is_unique and list(table["image"]) == [f"images/{i}.png" for i in table["id"]]
    assert sorted(p.name for p in (result.path / "images").iterdir()) == sorted(f"{i}.png" for i in table["id"])
    assert list(table["kind"]) == ["finetuned"] * 2 + ["checkpoint"] * 3 + ["base"] * 2
    assert list(table["step"]) == [4, 4, 1, 2, 3, 0, 0]
    assert list(table["template"]) == [SUBJECT, BEACH, SUBJECT, SUBJECT, SUBJECT, SUBJECT, BEACH]
    for row in table.itertuples():
        png = Image.open(result.path / row.image)
        assert png.size == (72, 72)
        expected_model = {"finetuned": f"train:{trained.key}", "base": f"base:{model.id}"}.get(row.kind, row.model)
        assert row.model == expected_model
        assert png.text == {
            "prompt": row.prompt,
            "negative_prompt": "blurry",
            "seed": "3",
            "steps": "2",
            "guidance": "5.0",
            "scheduler": "EulerDiscreteScheduler",
            "size": "72x72",
            "model": row.model,
            "kind": row.kind,
            "step": str(row.step),
        }


def test_sdxl_lora_renders_its_own_images(sdxl: tuple[ResolvedModel, StageResult], tmp_path: Path) -> None:
    result = _run(
        Store(tmp_path / "artifacts"),
        sdxl,
        prompts=(SUBJECT,),
        seeds=(0, 1),
        compare_base=True,
        validation_prompts=(SUBJECT,),
    )
    assert result.models_loaded == ("base pipeline: tiny-sdxl", "weights: step-2", "weights: finetuned")
    assert result.items_processed == 2 + 1 + 2
    images = _files(result)
    subject = "a photo of sks toy"
    for seed in (0, 1):
        lora, base = images[("finetuned", 4, subject, seed)], images[("base", 0, subject, seed)]
        assert _pixels(lora).shape == (64, 64, 3)
        assert _differ(lora, base) > 0.5
    assert _differ(images[("checkpoint", 2, subject, 0)], images[("finetuned", 4, subject, 0)]) > 0.2


def test_stage_key_leaves_out_batch_size_and_keeps_what_shapes_the_set(sd15: tuple[ResolvedModel, StageResult]) -> None:
    model, trained = sd15
    inputs = GenerateInputs(model, trained, TOKEN, CLASS, 64)
    key = generate.stage_key_for(GenerateSection(), inputs)
    assert generate.stage_key_for(GenerateSection(batch_size=1), inputs) == key
    changed = [
        generate.stage_key_for(GenerateSection(compare_base=True), inputs),
        generate.stage_key_for(GenerateSection(seeds=(0,)), inputs),
        generate.stage_key_for(GenerateSection(), replace(inputs, token="zwx")),
        generate.stage_key_for(GenerateSection(), replace(inputs, resolution=72)),
        generate.stage_key_for(GenerateSection(), replace(inputs, train=replace(trained, key="0" * 24))),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    moved = replace(inputs, train=replace(trained, path=Path("/elsewhere")))  # folders never reach a key
    assert generate.stage_key_for(GenerateSection(), moved) == key


def test_failures_name_the_image_and_commit_nothing(sd15: tuple[ResolvedModel, StageResult], tmp_path: Path) -> None:
    store = Store(tmp_path / "artifacts")
    model, trained = sd15
    # The config refuses such a size up front; bypass it to see how a failing pipeline call is reported.
    unrenderable = GenerateSection(**{**FAST, "prompts": (SUBJECT,), "seeds": (7,)}).model_copy(update={"size": 60})
    with pytest.raises(StageError, match="divisible by 8") as err:
        generate.run(unrenderable, GenerateInputs(model, trained, TOKEN, CLASS, 64), store)
    assert (err.value.stage, err.value.item) == ("generate", "a photo of sks toy seed 7")
    assert not (store.root / generate.STAGE).exists() and not (store.root / generate.ITEMS).exists()

    unknown = GenerateSection(**FAST).model_copy(update={"scheduler": "Nope"})  # as the Python API can pass it
    with pytest.raises(StageError, match="not a diffusers scheduler") as err:
        generate.run(unknown, GenerateInputs(model, trained, TOKEN, CLASS, 64), store)
    assert err.value.item == "generate.scheduler"

    with pytest.raises(StageError, match="cannot load the finetuned weights") as err:
        _run(store, _broken(sd15, tmp_path / "broken"), prompts=(BEACH,), seeds=(2,))
    assert err.value.item == "a toy on the beach seed 2"

    empty = replace(trained, path=tmp_path / "empty")
    lacks = r"the train output lacks training\.json; rerun `boothflow stage train`"
    with pytest.raises(StageError, match=lacks) as err:
        generate.run(GenerateSection(), GenerateInputs(model, empty, TOKEN, CLASS, 64), store)
    assert err.value.item == str(tmp_path / "empty" / "training.json")
