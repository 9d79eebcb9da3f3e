"""Which stage keys each setting changes: exactly the stages whose outputs it can change, and no folder path.

Keys below preprocess and class images hash what those stages produced, so each row builds them first (three small
images, two tiny class images: the cheap stages); a plan says so where that output is not there yet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from metric_models import build_clip, build_dino
from PIL import Image

from flows.dreambooth import planned_keys
from tasks.core.config import RunConfig
from tasks.core.config_load import load_config
from tasks.core.store import Store
from tasks.sd.models import resolve
from tasks.stages import class_images, preprocess, report_page

CLASS_SIDE = {"class_images", "latents", "train", "export", "generate", "evaluate", "report"}
IMAGE_SIDE = {"preprocess", "latents", "train", "export", "generate", "evaluate", "report"}
LISTING = {"preprocess", "report"}  # the same pixels from other names, files or settings: the report lists them
ALL = {"preprocess", "class_images", "latents", "train", "export", "generate", "evaluate", "report"}
TRAIN = {"train", "export", "generate", "evaluate", "report"}
GENERATE = {"generate", "evaluate", "report"}
SCORES = {"evaluate", "report"}

CHANGES = [
    ("model.id", "tiny-sdxl", CLASS_SIDE),
    ("model.vae", "SDXL_VAE", CLASS_SIDE),
    ("model.safety_checker", True, {"export"}),  # what the exported pipeline keeps; samples render without it
    ("run.name", "other", {"report"}),  # the report shows it
    ("run.device_memory", "24GiB", set()),
    ("run.concurrency_limit", "boothflow-gpu", set()),
    ("run.store", "memory://boothflow-test/keys", set()),  # where entries are shared, never what they hold
    ("data.captions", "sidecar", TRAIN),  # no .txt in the folder: every image keeps the prompt, and says so
    ("generate.validation_seeds", [0, 1], GENERATE),
    ("train.pick", "best:analyser", {"validate", "score", "select", "export", *GENERATE}),  # train stays
    ("train.pick_margin", 0.1, set()),  # select's, which a best pick plans (test_pick.py): train stays
    ("data.token", "zwx", TRAIN),
    ("data.class_name", "dog", CLASS_SIDE),
    ("data.instance_prompt", "a {token}", TRAIN),
    ("data.min_images", 2, LISTING),  # still satisfied
    ("data.settle_minutes", 0, set()),  # enters no key: which files settled does (test_flow_preprocess)
    ("publish.metric", "analyser", set()),  # a subjects night's gate, after every stage
    ("publish.tolerance", 0.1, set()),
    ("preprocess.resolution", 128, ALL),
    ("preprocess.crop", "face", LISTING),  # no face in these images: the centre crop
    ("preprocess.min_side", 100, LISTING),  # rejects none of them
    ("preprocess.max_pixels", 1_000_000, LISTING),
    ("preprocess.face_margin", 0.3, LISTING),  # with the centre crop
    ("prior.enabled", False, CLASS_SIDE),
    ("prior.class_prompt", "a {class}", CLASS_SIDE),
    ("prior.negative_prompt", "blurry", CLASS_SIDE),
    ("prior.num_images", 7, CLASS_SIDE),
    ("prior.loss_weight", 0.5, TRAIN),
    ("prior.scheduler", "EulerDiscreteScheduler", CLASS_SIDE),
    ("prior.steps", 3, CLASS_SIDE),
    ("prior.guidance", 5.0, CLASS_SIDE),
    ("prior.seed", 1, CLASS_SIDE),
    ("prior.dtype", "bfloat16", CLASS_SIDE),
    ("prior.vae_slicing", False, CLASS_SIDE),
    ("prior.batch_size", 2, set()),
    ("latents.dtype", "bfloat16", {"latents", *TRAIN}),
    ("latents.flip", True, {"latents", *TRAIN}),
    ("train.method", "lora", TRAIN),
    ("train.train_text_encoder", False, TRAIN),
    ("train.steps", 5, TRAIN),
    ("train.batch_size", 2, TRAIN),
    ("train.grad_accum", 2, TRAIN),
    ("train.learning_rate", 1e-4, TRAIN),
    ("train.lr_scheduler", "cosine", TRAIN),
    ("train.lr_warmup_steps", 2, TRAIN),
    ("train.optimizer", "adamw8bit", set()),  # no CUDA here: falls back to AdamW and is keyed as AdamW
    ("train.adam_beta1", 0.8, TRAIN),
    ("train.adam_beta2", 0.99, TRAIN),
    ("train.adam_weight_decay", 0.0, TRAIN),
    ("train.adam_epsilon", 1e-6, TRAIN),
    ("train.max_grad_norm", 0.5, TRAIN),
    ("train.noise_offset", 0.0, TRAIN),
    ("train.snr_gamma", 5.0, TRAIN),
    ("train.mixed_precision", "bf16", TRAIN),
    ("train.gradient_checkpointing", True, TRAIN),
    ("train.attention", "xformers", TRAIN),
    ("train.tf32", False, set()),  # no CUDA here: TF32 cannot change a number, so the key leaves it out
    ("train.channels_last", True, set()),
    ("train.compile_unet", True, set()),
    ("train.lora_rank", 8, TRAIN),
    ("train.lora_targets", ["to_q", "to_v"], TRAIN),
    ("train.seed", 1, TRAIN),
    ("train.sample_every", 2, TRAIN),
    ("train.checkpoint_every", 7, set()),
    ("train.checkpoint_minutes", 5.0, set()),
    ("train.log_every", 3, set()),
    ("train.keep_checkpoints", 5, set()),
    ("train.cpu_threads", 1, set()),
    ("train.num_processes", 2, TRAIN),  # the global batch doubles (batch_size is per process)
    ("export.dtype", "float16", {"export"}),  # the formats users load: never a retraining
    ("export.single_file", False, {"export"}),
    ("export.kohya", False, {"export"}),
    ("generate.prompts", ["a {token}"], GENERATE),
    ("generate.seeds", [5], GENERATE),
    ("generate.seeds", 3, GENERATE),  # a count: seeds 0, 1, 2
    ("generate.negative_prompt", "blurry", GENERATE),
    ("generate.scheduler", "EulerDiscreteScheduler", GENERATE),
    ("generate.steps", 3, GENERATE),
    ("generate.guidance", 4.0, GENERATE),
    ("generate.size", 128, GENERATE),
    ("generate.compare_base", True, GENERATE),
    ("generate.validation_prompts", ["a {class}"], GENERATE),
    ("generate.dtype", "bfloat16", GENERATE),
    ("generate.vae_slicing", False, GENERATE),
    ("generate.vae_tiling", True, GENERATE),
    ("generate.batch_size", 1, set()),
    ("evaluate.clip_model", "CLIP_FOLDER", SCORES),
    ("evaluate.dino_model", "DINO_FOLDER", SCORES),
    ("evaluate.analyser", "toy", SCORES),
    ("report.seeds_shown", 4, {"report"}),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("keys")
    folder = base / "instance"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (300 + 10 * i, 280), colour).save(folder / ("sub" if i else "") / f"img{i}.png")
    artifacts = base / "artifacts"
    tokenizer = resolve("tiny-sd15", "", artifacts).path / "tokenizer"
    folders = {
        "SDXL_VAE": str(resolve("tiny-sdxl", "", artifacts).vae_path),
        "CLIP_FOLDER": str(build_clip(base / "clip", tokenizer)),
        "DINO_FOLDER": str(build_dino(base / "dino")),
    }
    return folder, artifacts, folders


BASE = ["prior.enabled=true", "prior.num_images=2", "prior.steps=1", "preprocess.resolution=64"]


def _keys(folder: Path, artifacts: Path, *overrides: str) -> dict[str, str]:
    config = load_config(None, [f"data.instance_dir='{folder}'", *BASE, *overrides], artifacts)
    store = Store(artifacts)
    preprocess.run(config.preprocess, preprocess.PreprocessInputs.of(config), store)
    if config.prior.enabled:
        model = resolve(config.model.id, config.model.vae, artifacts)
        class_images.run(config.prior, class_images.ClassImagesInputs.of(config, model), store)
    return {stage: entry["key"] for stage, entry in planned_keys(config).items()}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage in before.keys() | after.keys() if before.get(stage) != after.get(stage)}


def test_every_setting_is_in_the_table() -> None:
    fields = {f"{s}.{f}" for s, m in RunConfig.model_fields.items() for f in m.annotation.model_fields}
    hub_only = {"model.revision", "model.vae_revision"}  # keyed through the identity of the commit: test_models.py
    unkeyed = {"run.artifacts_root", "data.instance_dir", "run.store_options"}  # paths, and how to reach the store
    assert fields - {*unkeyed, *hub_only} == {name for name, _, _ in CHANGES}


@pytest.mark.parametrize(("setting", "value", "changed"), CHANGES, ids=[c[0] for c in CHANGES])
def test_setting_changes_exactly_these_stage_keys(setup, setting: str, value, changed: set[str]) -> None:
    folder, artifacts, folders = setup
    value = folders.get(value, value) if isinstance(value, str) else value
    literal = f"'{value}'" if isinstance(value, str) else str(value).replace("'", '"').lower()
    before = _keys(folder, artifacts)
    after = _keys(folder, artifacts, f"{setting}={literal}")
    assert _changed(before, after) == changed


def test_moving_the_folder_or_the_artifact_root_changes_no_key(setup, tmp_path: Path) -> None:
    folder, artifacts, _ = setup
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "renamed folder")
    assert _keys(folder, artifacts) == _keys(moved, tmp_path / "other artifacts")


def test_dataset_content_changes_the_image_side_keys(setup, tmp_path: Path) -> None:
    folder, artifacts, _ = setup
    copy = shutil.copytree(folder, tmp_path / "copy")
    before = _keys(copy, artifacts)
    Image.new("RGB", (300, 300), "white").save(copy / "new.png")
    assert _changed(before, _keys(copy, artifacts)) == IMAGE_SIDE


def test_a_seed_count_keys_as_its_list(setup) -> None:
    folder, artifacts, _ = setup
    assert _keys(folder, artifacts, "generate.seeds=3") == _keys(folder, artifacts, "generate.seeds=[0, 1, 2]")


@pytest.mark.parametrize("edited", ["report.html.j2", "report.css"])
def test_editing_the_report_template_or_css_changes_only_the_report_key(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edited: str
) -> None:
    folder, artifacts, _ = setup
    before = _keys(folder, artifacts)
    templates = shutil.copytree(report_page._templates(), tmp_path / "templates")
    with (templates / edited).open("a") as file:
        file.write("\n")
    monkeypatch.setattr(report_page, "_templates", lambda: templates)
    assert _changed(before, _keys(folder, artifacts)) == {"report"}


def _rename(folder: Path) -> None:
    (folder / "img0.png").rename(folder / "renamed.png")


def _junk(folder: Path) -> None:
    (folder / "Thumbs.db").write_bytes(b"\0" * 64)


def _duplicate(folder: Path) -> None:
    shutil.copy(folder / "img0.png", folder / "again.png")


def _too_small(folder: Path) -> None:
    Image.new("RGB", (40, 40), "yellow").save(folder / "tiny.png")


@pytest.mark.parametrize("edit", [_rename, _junk, _duplicate, _too_small], ids=lambda f: f.__name__.strip("_"))
def test_names_and_rejected_files_change_only_the_listing(setup, tmp_path: Path, edit) -> None:
    folder, artifacts, _ = setup
    copy = shutil.copytree(folder, tmp_path / "copy")
    before = _keys(copy, artifacts)
    edit(copy)
    assert _changed(before, _keys(copy, artifacts)) == LISTING


def test_a_plan_says_which_output_a_key_waits_for(setup, tmp_path: Path) -> None:
    folder, artifacts, _ = setup
    _keys(folder, artifacts)  # the class images are built
    copy = shutil.copytree(folder, tmp_path / "copy")
    Image.new("RGB", (320, 300), "purple").save(copy / "new.png")  # so its preprocess output is not in the store
    config = load_config(None, [f"data.instance_dir='{copy}'", *BASE], artifacts)
    planned = planned_keys(config)
    assert planned["preprocess"]["status"] == "to run" and planned["preprocess"]["key"]
    assert planned["class_images"]["status"] == "cached"
    for stage in ("latents", "train", "export", "generate", "evaluate", "report"):
        assert planned[stage] == {"status": "after preprocess", "key": None}, stage
