"""The model card of a pretrained toy model: what it is, how it was made, what it scores."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

EXAMPLE_CAPTIONS = (
    "a photo of a red circle on a blue background",
    "a photo of a green and blue square on a white background",
)
CARD_TEMPLATE = resources.files(__package__) / "templates" / "model_card.md"
NOTES = "## Notes from the run that made these weights"  # written by hand after a run; kept when the card is rewritten


def write_model_card(folder: Path) -> None:
    """README.md of a pretrained toy model, from its scores.json: what it is, how it was made, what it scores.

    Written again over an existing card (a new template, no retraining), it keeps what a person added under NOTES."""
    scores = json.loads((folder / "scores.json").read_text())
    plan = scores["plan"]
    old = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    vae = (
        f"The VAE is {plan['vae_from']}'s, checked against the gate"
        if plan.get("vae_from")
        else f"The VAE trained {plan['vae_batch']} images per step (AdamW, LR {plan['vae_lr']}, cosine decay from step"
        f" {plan['vae_anneal_from']}) until its gate passed (at most {plan['vae_steps']} steps)"
    )
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["boothflow", "toy-sd", "stable-diffusion", "text-to-image"],
        widget=[{"text": caption} for caption in EXAMPLE_CAPTIONS],
    )
    card = ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        quick=plan["name"] == "quick",
        plan=plan,
        vae=vae,
        cpu=f"{scores['cpu_seconds'] / 60:.0f} CPU minutes ({scores['wall_seconds'] / 60:.0f} minutes wall",
        gate=", ".join(f"{name} {100 * value:.1f}%" for name, value in scores["vae_gate"].items()),
        floors=", ".join(f"{name} >= {100 * value:.0f}%" for name, value in plan["gate"]),
        fidelity=", ".join(f"{name} {100 * value:.1f}%" for name, value in scores["caption_fidelity"].items()),
        final_loss=scores["final_loss"],
        notes=old[old.find(NOTES) :].strip() if NOTES in old else "",
    )
    card.save(folder / "README.md")
