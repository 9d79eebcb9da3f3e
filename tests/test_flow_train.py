"""The whole flow through the CLI against the suite's Prefect server: preprocess -> latents -> train, then reruns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image
from prefect_api import task_states

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--set", "train.steps=4", "--set", "train.checkpoint_every=0", "--set", "train.sample_every=0",
         "--set", "generate.steps=2"]  # fmt: skip


def _stages(path: Path) -> dict:
    return json.loads(path.read_text())["stages"]


def test_rerun_is_all_cached_and_one_changed_image_costs_one_image(boothflow, prefect_server: str, tmp_path: Path):
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    base = ["--config", "configs/demo.toml", "--artifacts", tmp_path / "a", "--set", f"data.instance_dir='{images}'",
            *QUICK, "--set", "train.sample_every=2"]  # fmt: skip
    boothflow("run", *base, "--summary", tmp_path / "1.json")
    first = _stages(tmp_path / "1.json")
    assert [(s["status"], s["items_processed"]) for s in first.values()][:3] == [("ran", 6), ("ran", 6), ("ran", 4)]
    assert first["generate"]["status"] == "ran" and first["generate"]["items_processed"] > 0
    loaded = json.loads((tmp_path / "1.json").read_text())["models_loaded"]
    # Base, step-2 and final samples: the base pipeline loads once and wears each set's weights in turn.
    assert [m for m in loaded if m.startswith("generate: ")] == [
        "generate: base pipeline: tiny-sd15", "generate: weights: step-2", "generate: weights: finetuned"
    ]  # fmt: skip

    warm = boothflow("run", *base, "--summary", tmp_path / "2.json", env={"PYTHONPROFILEIMPORTTIME": "1"})
    summary = json.loads((tmp_path / "2.json").read_text())
    assert [(s["status"], s["items_processed"]) for s in summary["stages"].values()] == [("cached", 0)] * len(first)
    assert summary["models_loaded"] == []
    imported = {line.split("|")[-1].strip() for line in warm.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not {"diffusers", "transformers"} & imported  # seconds a cached run has no use for
    assert task_states(prefect_server, summary["run"]["flow_run_id"]) == dict.fromkeys(summary["stages"], "Cached")
    model_dir = Path(summary["outputs"]["model_dir"])  # loads as it is, as a hub repository would
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    assert type(pipe) is StableDiffusionPipeline and (model_dir / "model.safetensors").is_file()
    assert ModelCard.load(model_dir / "README.md").data.instance_prompt == "a photo of sks toy"

    # Another export dtype exports again from the cached training; nothing else runs.
    boothflow("run", *base, "--set", "export.dtype='float16'", "--summary", tmp_path / "half.json")
    half = json.loads((tmp_path / "half.json").read_text())
    assert {name: s["status"] for name, s in half["stages"].items()} == {
        **dict.fromkeys(first, "cached"),
        "export": "ran",
    }
    assert half["models_loaded"] == ["export: text_encoder, unet, vae in float16",
                                     "export: unet, vae, text_encoder for the single file"], half  # fmt: skip
    halved = StableDiffusionPipeline.from_pretrained(half["outputs"]["model_dir"], dtype=torch.float16)
    assert {p.dtype for p in halved.unet.parameters()} == {torch.float16}

    # A user edits the model card inside the export: the entry is kept aside whole, said once, and exported again.
    card = model_dir / "README.md"
    card.write_text(card.read_text() + "\nmy notes\n")
    damaged = boothflow("run", *base, "--summary", tmp_path / "2b.json")
    export_key = model_dir.parent.name
    [line] = [x for x in damaged.stderr.splitlines() if "damaged cache entry" in x]
    assert f"damaged cache entry export/{export_key}: model/README.md " in line and "bytes, the manifest says" in line
    again = _stages(tmp_path / "2b.json")
    assert (again["export"]["status"], again["train"]["status"]) == ("ran", "cached")
    [aside] = (tmp_path / "a" / "export").glob(f"{export_key}.damaged-*")
    assert (aside / "model" / "README.md").read_text().endswith("my notes\n")
    listing = boothflow("cache", "ls", "--artifacts", tmp_path / "a").stdout
    assert any(aside.name[:20] in row and "damaged" in row for row in listing.splitlines()), listing

    edited = images / "toy_03_beach.webp"
    Image.open(edited).rotate(90).save(edited)
    boothflow("run", *base, "--summary", tmp_path / "3.json")
    third = _stages(tmp_path / "3.json")
    counts = {name: (s["status"], s["items_processed"], s["items_cached"]) for name, s in third.items()}
    assert {k: counts[k] for k in ("preprocess", "latents", "train")} == {
        "preprocess": ("ran", 1, 5), "latents": ("ran", 1, 5), "train": ("ran", 4, 0)
    }  # fmt: skip


def test_stage_names_a_missing_upstream(boothflow, tmp_path: Path) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    proc = boothflow(
        "stage", "train", "--config", "configs/demo.toml", "--artifacts", tmp_path / "a",
        "--set", f"data.instance_dir='{images}'", "--summary", tmp_path / "s.json", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    error = json.loads((tmp_path / "s.json").read_text())["error"]
    assert error["stage"] == "train" and "upstream stage 'preprocess' has no cached output" in error["message"]


def test_a_killed_training_run_resumes_on_rerun_and_says_so(boothflow, tmp_path: Path) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    base = ["--config", "configs/demo.toml", "--artifacts", tmp_path / "a", "--set", f"data.instance_dir='{images}'",
            "--set", "train.steps=5", "--set", "train.checkpoint_every=2"]  # fmt: skip
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"kill_train_after_step": 3}))
    env = {"BOOTHFLOW_FAULTS": str(faults), "PREFECT_LOGGING_LEVEL": "INFO"}
    killed = boothflow("run", *base, "--summary", tmp_path / "1.json", check=False, env=env)
    assert killed.returncode == 1
    error = json.loads((tmp_path / "1.json").read_text())["error"]
    assert (error["stage"], error["item"]) == ("train", "step 4") and "exited with code" in error["message"]

    faults.unlink()
    resumed = boothflow("run", *base, "--summary", tmp_path / "2.json", env=env)
    assert "resuming from checkpoint" in resumed.stdout + resumed.stderr
    train = _stages(tmp_path / "2.json")["train"]
    assert (train["status"], train["items_processed"], train["items_cached"]) == ("ran", 3, 2)


def test_changing_a_prompt_renders_only_its_images_and_reruns_the_report(boothflow, tmp_path: Path) -> None:
    images = shutil.copytree(REPO / "data" / "demo", tmp_path / "images")
    base = ["--config", "configs/demo.toml", "--artifacts", tmp_path / "a", "--set", f"data.instance_dir='{images}'",
            *QUICK, "--set", "generate.compare_base=false"]  # fmt: skip
    prompts = ["a photo of {token} {class}", "a photo of {token} {class} on the beach"]
    boothflow("run", *base, "--set", f"generate.prompts={json.dumps(prompts)}", "--summary", tmp_path / "1.json")
    prompts[1] = "a photo of {token} {class} in the snow"
    boothflow("run", *base, "--set", f"generate.prompts={json.dumps(prompts)}", "--summary", tmp_path / "2.json")
    second = json.loads((tmp_path / "2.json").read_text())
    stages = second["stages"]
    assert [stages[s]["status"] for s in ("preprocess", "latents", "train")] == ["cached"] * 3
    seeds = 2  # configs/demo.toml
    assert (stages["generate"]["status"], stages["generate"]["items_processed"]) == ("ran", seeds)
    assert stages["generate"]["items_cached"] == seeds
    assert stages["report"]["status"] == "ran"
    assert "in the snow" in Path(second["outputs"]["report_html"]).read_text()
