"""The memory plan: the real architectures counted exactly, estimates that move with each setting as memory does,
remedies that really fit, and a run that stops before any model loads when its config cannot fit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.core.config import RunConfig
from tasks.core.config_load import load_config
from tasks.core.values import GIB, parse_memory
from tasks.sd import memory
from tasks.sd.architectures import COMPONENT_CONFIGS
from tasks.sd.memory import (
    MIXED_ACTIVATIONS,
    Architecture,
    MemoryPlanError,
    estimate_train,
)
from tasks.sd.memory_plan import check_memory, check_precision, estimates

REPO = Path(__file__).resolve().parents[1]
SD15, SDXL = (Architecture(family, COMPONENT_CONFIGS[family]) for family in ("sd15", "sdxl"))
# Parameter counts of the released stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 components.
RELEASED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


def recipe(name: str, *overrides: str) -> RunConfig:
    return load_config(REPO / "configs" / f"{name}.toml", list(overrides))


@pytest.mark.parametrize(("family", "component"), RELEASED, ids=[f"{f}-{c}" for f, c in RELEASED])
def test_full_size_configs_have_the_released_parameter_counts(family: str, component: str) -> None:
    arch = Architecture(family, COMPONENT_CONFIGS[family])
    assert memory.count_parameters(memory.meta_component(arch, component)) == RELEASED[family, component]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * GIB), ("24 GB", 24 * 10**9), ("80G", 80 * GIB), ("16384MiB", 16 * GIB), ("8", 8 * GIB)],
)
def test_memory_amounts(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "24 parsecs", "-3GiB", ""])
def test_bad_memory_amounts_name_the_format(text: str) -> None:
    with pytest.raises(ValueError, match="write it like 24GiB"):
        parse_memory(text)


def test_sd15_recipe_counts_weights_gradients_and_adamw_for_unet_and_text_encoder() -> None:
    trainable = RELEASED["sd15", "unet"] + RELEASED["sd15", "text_encoder"]
    parts = estimate_train(SD15, recipe("sd15").train, 512, prior=False).parts
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (4 * trainable, 4 * trainable, 8 * trainable)
    eight_bit = estimate_train(SD15, recipe("sd15-24gb").train, 512, prior=False).parts
    assert eight_bit["optimizer"] == 2 * trainable
    assert eight_bit["activations"] >= 2 * trainable  # fp16 autocast keeps a half-precision copy of every weight


def test_adamw_step_scratch_counts_where_it_outgrows_the_activations() -> None:
    """On an H200 the SD 1.5 full fine-tune peaked in the optimizer step at 5x its fp32 weights (AdamW's
    multi-tensor step builds a denominator for every parameter); 8-bit Adam steps in place."""
    trainable = RELEASED["sd15", "unet"] + RELEASED["sd15", "text_encoder"]
    cfg = recipe("sd15").train.model_copy(update={"optimizer": "adamw", "mixed_precision": "no"})
    parts = estimate_train(SD15, cfg, 512, prior=False).parts
    assert parts["activations"] < 4 * trainable
    assert parts["activations"] + parts["optimizer step"] == 4 * trainable
    assert sum(parts.values()) - parts["runtime"] == 20 * trainable
    at_1024 = estimate_train(SD15, cfg, 1024, prior=False).parts
    assert at_1024["activations"] > 4 * trainable and at_1024["optimizer step"] == 0
    assert estimate_train(SD15, recipe("sd15-24gb").train, 512, prior=False).parts["optimizer step"] == 0


def test_sdxl_lora_counts_frozen_weights_in_half_precision_and_only_adapters_as_trainable() -> None:
    parts = estimate_train(SDXL, recipe("sdxl").train, 1024, prior=False).parts
    adapters = parts["gradients"] // 4
    assert 0 < adapters < 0.01 * RELEASED["sdxl", "unet"]  # rank 4 on the attention projections
    assert parts["weights"] == 2 * RELEASED["sdxl", "unet"] + 4 * adapters  # frozen encoders: cached embeddings
    assert parts["optimizer"] == 2 * adapters  # 8-bit Adam, as configured for the GPU it will run on


def _activations(arch: Architecture, resolution: int = 512, prior: bool = False, **settings) -> int:
    cfg = recipe("sd15").train.model_copy(update=settings)
    return estimate_train(arch, cfg, resolution, prior).parts["activations"]


def test_activations_follow_resolution_batch_prior_checkpointing_and_precision() -> None:
    base = _activations(SD15)
    assert _activations(SD15, resolution=1024) > 3.5 * base  # 4x the latent pixels
    assert _activations(SD15, batch_size=2) == pytest.approx(2 * base, rel=0.05)
    assert _activations(SD15, prior=True) == _activations(SD15, batch_size=2)  # as many class images
    assert _activations(SD15, gradient_checkpointing=True) < 0.5 * base
    assert _activations(SD15, mixed_precision="bf16") - 2 * (
        RELEASED["sd15", "unet"] + RELEASED["sd15", "text_encoder"]
    ) == pytest.approx(base * MIXED_ACTIVATIONS, rel=0.01)


@pytest.mark.parametrize(("name", "device"), [("sd15", "80GiB"), ("sd15-24gb", "24GiB"), ("sdxl", "24GiB")])
def test_recipes_fit_their_devices(name: str, device: str) -> None:
    assert check_memory(recipe(name), parse_memory(device)) == []


def test_the_named_remedies_fit_and_one_fewer_does_not() -> None:
    config, device = recipe("sd15"), 16 * GIB
    with pytest.raises(MemoryPlanError) as err:
        check_memory(config, device)
    message = str(err.value)
    assert message.startswith("memory plan: train needs ~") and "but the device has 16.0 GiB" in message
    remedies = re.findall(r"--set (\S+)=(\S+)", message.split("settings that would fit:")[1])
    assert remedies and remedies[0] == ("train.gradient_checkpointing", "true")
    overrides = [f"{name}={value}" for name, value in remedies]
    fixed = recipe("sd15", *overrides)
    assert next(e for e in estimates(fixed, SD15) if e.stage == "train").total <= device
    fewer = recipe("sd15", *overrides[:-1])
    assert next(e for e in estimates(fewer, SD15) if e.stage == "train").total > device


def test_a_plan_within_ten_percent_warns() -> None:
    config = recipe("sdxl")
    train = next(e for e in estimates(config, SDXL) if e.stage == "generate")
    warnings = check_memory(config, int(train.total * 1.05))
    assert len(warnings) == 1 and "generate needs" in warnings[0] and "within 10%" in warnings[0]


def test_an_architecture_unknown_before_download_is_not_checked(tmp_path: Path) -> None:
    config = load_config(None, ["model.id='someone/unknown-model'"], tmp_path)
    assert check_memory(config, 1) == [
        "memory plan: the architecture of 'someone/unknown-model' is unknown until it is downloaded; not checked"
    ]


@pytest.mark.parametrize(
    "setting",
    ["train.mixed_precision='fp16'", "generate.dtype='float16'", "latents.dtype='float16'"],
)
def test_fp16_without_cuda_is_one_line_naming_the_setting(setting: str, tmp_path: Path) -> None:
    config = load_config(None, [setting], tmp_path)
    with pytest.raises(MemoryPlanError) as err:
        check_precision(config)
    name = setting.split("=")[0]
    assert str(err.value).startswith(f"{name} asks for fp16, which needs a CUDA GPU") and "\n" not in str(err.value)


def test_a_config_that_cannot_fit_stops_before_any_model_loads(boothflow, tmp_path: Path) -> None:
    """SD 1.5 full fine-tune + text encoder, fp32, no checkpointing, batch 8 at 1024 px on an 8 GiB device (the
    full-size SD 1.5 architecture preset: a run checks its model is at hand before anything, and no SD 1.5 weights
    are here)."""
    artifacts, summary = tmp_path / "artifacts", tmp_path / "summary.json"
    too_big = ["-c", "configs/sd15.toml", "--set", "model.id='sd15-arch'", "--set", "train.batch_size=8",
               "--set", "preprocess.resolution=1024"]  # fmt: skip
    proc = boothflow("run", *too_big, "--device-memory", "8GiB", "--artifacts", artifacts, "--summary", summary,
                     check=False)  # fmt: skip
    assert proc.returncode == 1
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed (")]
    assert len(failed) == 1 and failed[0].startswith("failed (plan): memory plan: train needs ~")
    assert "but the device has 8.0 GiB" in failed[0] and "--set train.gradient_checkpointing=true" in failed[0]
    result = json.loads(summary.read_text())
    assert result["models_loaded"] == [] and result["error"]["stage"] == "plan"
    assert {s["status"] for s in result["stages"].values()} == {"skipped"}
    assert [p.name for p in artifacts.iterdir() if not p.name.startswith(".")] == ["runs"]  # no stage wrote

    fits = boothflow("plan", *too_big, "--device-memory", "80GiB", "--artifacts", artifacts)
    assert "fits in 80.0 GiB (as stated)" in fits.stderr
