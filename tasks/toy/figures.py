"""The toy DreamBooth figures: what the analyser reads in a run's final samples, and the thresholds configs/toy.toml
must clear on the shipped toy-sd; benchmarks/toy_figures.py measures how far each sits over several training seeds."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tasks.toy.score import Reading, read

SUBJECT = "a photo of sks circle"
CONTEXT = "a photo of sks circle on a green background"
CLASS = "a photo of a circle"
SAMPLES_PER_RATE = 64
# The run without prior preservation renders only the plain class prompt, the one its leak is read from.
WITHOUT_PRIOR = ("prior.enabled=false", "generate.compare_base=false", "train.sample_every=0",
                 'generate.prompts=["a photo of a {class}"]')  # fmt: skip


@dataclass(frozen=True)
class Figure:
    """One rate of a run's final samples (`kind` base or finetuned, `prompt`), of images that show the subject or a
    green background (`shows`), held to at least or at most `threshold`."""

    name: str
    kind: str
    prompt: str
    shows: str  # "subject" or "green background"
    at_least: bool
    threshold: float

    def count(self, found: dict[tuple[str, str], list[Reading]]) -> tuple[int, int]:
        """(images that show it, images read) in `found`."""
        members = found[self.kind, self.prompt]
        shown = [r.subject if self.shows == "subject" else r.background == "green" for r in members]
        return sum(shown), len(members)

    def spare(self, hits: int, images: int) -> int:
        """How many images could be read the wrong way for this figure and it would still clear its threshold
        (negative: it does not clear it)."""
        if self.at_least:
            return hits - math.ceil(self.threshold * images - 1e-9)
        return math.floor(self.threshold * images + 1e-9) - hits


# The thresholds configs/toy.toml must clear with one image of 64 to spare, whatever the training seed: each lies
# between what six training seeds gave (benchmarks/toy_figures.py, figures in README.md) and what a run that learned
# nothing, or kept nothing out, gives. The worst seed clears each by at least 4 images, and where the seeds differ
# their mean sits at least 3.6 standard deviations inside (about 2 failing trajectories in 10,000, taken as normal).
BASE_KNOWS_NOTHING = Figure("base model shows the subject", "base", SUBJECT, "subject", False, 0.08)
LEARNED = Figure("fine-tuned shows the subject", "finetuned", SUBJECT, "subject", True, 0.15)
IN_CONTEXT = Figure("subject on a green background", "finetuned", CONTEXT, "green background", True, 0.60)
KEPT_OUT = Figure("plain circles show the subject", "finetuned", CLASS, "subject", False, 0.20)
LEAKS_WITHOUT_PRIOR = Figure("plain circles show it, no prior", "finetuned", CLASS, "subject", True, 0.40)
WITH_PRIOR = (BASE_KNOWS_NOTHING, LEARNED, IN_CONTEXT, KEPT_OUT)


def readings(report: Path) -> dict[tuple[str, str], list[Reading]]:
    """The analyser's reading of every final sample (base and fine-tuned) of a run's report folder, by (kind,
    prompt)."""
    facts = json.loads((report / "report.json").read_text())
    found: dict[tuple[str, str], list[Reading]] = defaultdict(list)
    for sample in facts["samples"]:
        if sample["kind"] in ("base", "finetuned"):
            with Image.open(report / sample["image"]) as image:
                found[sample["kind"], sample["prompt"]].append(read(image))
    return found
