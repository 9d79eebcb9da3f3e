"""The shipped presets load and carry the reference recipes' values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.config import ConfigError
from tasks.core.config_load import load_config
from tasks.core.shipped import shipped_configs, shipped_root

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

RECIPES = {
    "sd15.toml": {
        "model.id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "model.safety_checker": False,
        "data.instance_prompt": "A photo of {token}", "preprocess.resolution": 512, "train.method": "full",
        "train.train_text_encoder": True, "train.steps": 400, "train.batch_size": 1, "train.grad_accum": 1,
        "train.learning_rate": 5e-6, "train.lr_scheduler": "constant", "train.lr_warmup_steps": 0,
        "train.noise_offset": 0.1,
    },
    "sd15-24gb.toml": {  # the same recipe with the memory savers that fit it in 24 GiB (tests/test_memory.py)
        "model.id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "preprocess.resolution": 512,
        "train.method": "full", "train.train_text_encoder": True, "train.steps": 400, "train.batch_size": 1,
        "train.learning_rate": 5e-6, "train.lr_scheduler": "constant", "train.noise_offset": 0.1,
        "train.mixed_precision": "fp16", "train.gradient_checkpointing": True, "train.optimizer": "adamw8bit",
    },
    "sdxl.toml": {
        "model.id": "stabilityai/stable-diffusion-xl-base-1.0", "model.vae": "madebyollin/sdxl-vae-fp16-fix",
        "data.instance_prompt": "A photo of {token}'s face", "preprocess.resolution": 1024, "train.method": "lora",
        "train.steps": 500, "train.batch_size": 1, "train.grad_accum": 4, "train.learning_rate": 1e-4,
        "train.lr_scheduler": "constant", "train.lr_warmup_steps": 0, "train.mixed_precision": "fp16",
        "train.gradient_checkpointing": True, "train.optimizer": "adamw8bit", "train.seed": 0,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_presets_hold_the_recipe_values(name: str) -> None:
    config = load_config(CONFIGS / name)
    for setting, value in RECIPES[name].items():
        section, field = setting.split(".")
        assert getattr(getattr(config, section), field) == value, setting


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    assert load_config(path).run.name


def test_folders_are_absolute_with_the_home_folder_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, ["data.instance_dir=~/photos/rex", "run.artifacts_root=~/runs"])
    assert config.data.instance_dir == tmp_path / "photos" / "rex"
    assert config.run.artifacts_root == tmp_path / "runs"


def test_the_editable_install_ships_the_repo_configs() -> None:
    assert shipped_configs() == {path.stem: path for path in CONFIGS.glob("*.toml")}


@pytest.mark.parametrize("name", ["toy", "toy.toml"])
def test_a_shipped_config_by_name_takes_its_images_from_the_shipped_data(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(Path(name))
    assert config.data.instance_dir == shipped_root() / "data" / "toy" and config.data.instance_dir.is_dir()
    assert config.run.artifacts_root == tmp_path / "artifacts"  # outputs stay where the user is
    assert load_config(Path(name), ["data.instance_dir=mine"]).data.instance_dir == tmp_path / "mine"


def test_a_file_keeps_its_paths_relative_to_the_working_directory_even_under_a_shipped_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").write_text('[data]\ninstance_dir = "data/toy"\n')
    assert load_config(Path("toy")).data.instance_dir == tmp_path / "data" / "toy"


@pytest.mark.parametrize("path", ["nope", "configs/toy.toml.bak", "elsewhere/toy"])
def test_an_unknown_config_names_the_file_and_the_shipped_ones(
    path: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"^config file '{path}' not found; shipped configs: demo, sd15, .*toy$"):
        load_config(Path(path))
