"""The model card (README.md beside the weights): the hub's metadata through huggingface_hub's ModelCard, and a body
rendered from `templates/model_card.md` that says how the weights were made."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from tasks.sd.layout import KOHYA_FILE, LORA_FILE, SINGLE_FILE

CARD_FIELDS = ("family", "base_model", "instance_prompt", "steps", "final_loss", "settings")
FAMILY_TAGS = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl"}
CARD_TEMPLATE = resources.files(__package__) / "templates" / "model_card.md"


def _backtick_fence(text: str, shortest: int) -> str:
    """A run of backticks longer than any in `text`, so the text inside needs no escaping."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(shortest, longest + 1)


def _cell(value: Any) -> str:
    """A value as an inline code span in a table row: strings as is (only `|` escaped for the table), anything
    else, and strings with line breaks (which would end the row), as JSON."""
    plain = isinstance(value, str) and not re.search(r"[\r\n]", value)
    text = value if plain else json.dumps(value, ensure_ascii=False, default=str)
    fence = _backtick_fence(text, 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    escaped = text.replace("|", "\\|")
    return f"{fence}{pad}{escaped}{pad}{fence}"


def _block(text: str, language: str) -> str:
    fence = _backtick_fence(text, 3)
    return f"{fence}{language}\n{text}\n{fence}"


def write_model_card(out: Path, facts: dict[str, Any]) -> None:
    """README.md beside the weights: the hub's metadata (through huggingface_hub's ModelCard) and a body that says
    how they were made, rendered from `templates/model_card.md`.

    `facts` needs family ("sd15"|"sdxl"), base_model, instance_prompt, steps, final_loss (float or None) and
    settings (the recipe as {name: value}); it may add base_model_repo (the hub id the metadata names, when the base
    model is one), lora, safety_checker and files (as the save functions
    return them), widget_prompts (default: the instance prompt) and license (default "other", a placeholder for the
    base model's license). User text is written verbatim: YAML-quoted in the metadata, in code blocks and spans in
    the body, never as HTML."""
    missing = [field for field in CARD_FIELDS if field not in facts]
    if missing:
        raise ValueError(f"model card facts lack {missing}")
    lora = bool(facts.get("lora", False))
    loss = facts["final_loss"]
    data = ModelCardData(
        base_model=facts.get("base_model_repo"),  # the hub rejects a card whose base model is no repository
        license=facts.get("license", "other"),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["boothflow", "dreambooth", FAMILY_TAGS[facts["family"]], *(["lora"] if lora else []), "text-to-image"],
        instance_prompt=facts["instance_prompt"],
        # Prompts only: the samples are rendered after training, by the generate stage, into its own entry.
        widget=[{"text": prompt} for prompt in facts.get("widget_prompts") or [facts["instance_prompt"]]],
    )
    settings = {
        "base model": str(facts["base_model"]),
        "instance prompt": data.instance_prompt,
        "steps": facts["steps"],
        "final loss": "n/a" if loss is None else f"{loss:.6g}",
        **({"safety checker": facts["safety_checker"]} if "safety_checker" in facts else {}),
        **facts["settings"],
    }
    card = ModelCard.from_template(
        data,
        template_path=str(CARD_TEMPLATE),
        base_model=str(facts["base_model"]),
        lora=lora,
        steps=facts["steps"],
        settings=settings,
        files=facts.get("files", {}),
        cell=_cell,
        block=_block,
        single_file=SINGLE_FILE,
        lora_file=LORA_FILE,
        kohya_file=KOHYA_FILE,
    )
    card.save(out / "README.md")
