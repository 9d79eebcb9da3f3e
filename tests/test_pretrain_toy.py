"""Pretraining toy-sd: chunks resume exactly, the VAE gate holds the UNet back, `--quick` pauses, resumes and loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from tasks.sd.presets import SHIPPED_FOLDER
from tasks.toy.card import NOTES, write_model_card
from tasks.toy.gate import passes
from tasks.toy.plan import QUICK, PretrainError
from tasks.toy.pretrain import pretrain

# Seconds-long plans that train their own VAE: the gate asks for nothing, two sampler steps per fidelity image.
MICRO = replace(
    QUICK,
    vae_from="",
    gate=(("colour", 0.0),),
    vae_steps=4,
    vae_batch=4,
    gate_every=2,
    gate_images=8,
    scenes=64,
    unet_steps=5,
    unet_batch=4,
    warmup=2,
    eval_steps=2,
)
COMPONENTS = ("unet", "vae", "text_encoder")


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(next((folder / name).glob("*.safetensors"))) for name in COMPONENTS}


@pytest.mark.training
def test_a_run_in_one_step_chunks_equals_an_unbroken_run(tmp_path: Path) -> None:
    whole = pretrain(tmp_path / "whole", MICRO, minutes=60)
    calls, state = 0, None
    while state is None or state.phase != "done":  # minutes=0: every call does one step and saves
        state = pretrain(tmp_path / "chunked", MICRO, minutes=0)
        calls += 1
    assert whole.phase == "done" and calls >= MICRO.vae_steps + MICRO.unet_steps
    assert state.losses == whole.losses and len(whole.losses) == MICRO.unet_steps
    assert state.scaling_factor == whole.scaling_factor != 1.0
    one, other = _weights(tmp_path / "whole"), _weights(tmp_path / "chunked")
    for name in COMPONENTS:
        assert one[name].keys() == other[name].keys()
        assert all(torch.equal(one[name][k], other[name][k]) for k in one[name]), name
    # a finished run is not trained again
    assert pretrain(tmp_path / "whole", MICRO, minutes=60).losses == whole.losses


def test_the_unet_never_starts_before_the_vae_passes_its_gate(tmp_path: Path) -> None:
    strict = replace(MICRO, gate=(("colour", 1.01),), vae_steps=4, gate_every=2)
    for _ in range(2):  # asking again does not train on until the gate happens to pass
        with pytest.raises(PretrainError, match=r"VAE missed its gate after 4 steps: colour \d+%.*needs colour 101%"):
            pretrain(tmp_path / "model", strict, minutes=60)
    assert not (tmp_path / "model.work" / "latents.safetensors").exists()
    assert not (tmp_path / "model").exists()
    with pytest.raises(PretrainError, match="started with another plan"):
        pretrain(tmp_path / "model", replace(strict, unet_lr=1.0), minutes=60)
    # a VAE adopted from a shipped model is held to the same gate
    with pytest.raises(PretrainError, match=r"the VAE of toy-sd misses the gate: colour \d+%.*needs colour 101%"):
        pretrain(tmp_path / "adopted", replace(strict, vae_from="toy-sd"), minutes=60)
    assert not (tmp_path / "adopted.work" / "latents.safetensors").exists()


def test_quick_pretraining_through_the_cli_pauses_resumes_and_loads(boothflow, tmp_path: Path) -> None:
    out = tmp_path / "toy-quick"
    paused = boothflow("models", "pretrain-toy", "--quick", "--out", out, "--minutes", "0", check=False)
    assert paused.returncode == 3, paused.stderr
    assert "run the same command again" in paused.stderr and not out.exists()
    done = boothflow("models", "pretrain-toy", "--quick", "--out", out, "--minutes", "30")
    assert f"done: {out}" in done.stderr
    scores = json.loads((out / "scores.json").read_text())
    # Its caption fidelity is scored (on the shipped model's VAE, 100 UNet steps leave colour at chance).
    assert set(scores["caption_fidelity"]) == {"colour", "background", "shape", "all"}
    assert passes(scores["vae_gate"], QUICK) and scores["cpu_seconds"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(scores["scaling_factor"])
    latent = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latent.shape == (1, 4, 16, 16)


def test_the_shipped_card_is_its_template_rendered_from_its_scores(tmp_path: Path) -> None:
    """Rewriting the card from scores.json (no retraining) gives the shipped card back, notes written by hand
    included, and the hub reads its metadata."""
    shipped = SHIPPED_FOLDER / "toy-sd"
    for name in ("scores.json", "README.md"):
        (tmp_path / name).write_bytes((shipped / name).read_bytes())
    write_model_card(tmp_path)
    assert (tmp_path / "README.md").read_bytes() == (shipped / "README.md").read_bytes()
    card = ModelCard.load(shipped / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "text-to-image")
    assert "toy-sd" in card.data.tags and len(card.data.widget) == 2
    assert card.text.count(NOTES) == 1
    (tmp_path / "README.md").unlink()  # a new model: no notes yet
    write_model_card(tmp_path)
    assert NOTES not in (tmp_path / "README.md").read_text()
