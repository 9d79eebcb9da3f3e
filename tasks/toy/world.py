"""The toy world: seeded, captioned renders of one flat shape on a flat background, and the DreamBooth subject.

A world small enough to pretrain a Stable Diffusion-shaped model on CPU, yet one where every image's content is
known exactly, so the analyser (`tasks.toy.score`) can tell whether a generated image shows what its prompt asked.
A quarter of the shapes are two-tone (left half one colour, right half another), so a model pretrained here knows
what a two-tone shape is, as Stable Diffusion knows what a dog is before DreamBooth teaches it one dog. The subject
is a red and yellow circle: `scene` never pairs red with yellow, only `subject_scene` draws it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled, so edges are anti-aliased like a photo's
TWO_TONE_SHARE = 0.25  # of pretraining scenes

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")

# The DreamBooth subject: a circle whose left half is red and right half is yellow. Pretraining never puts red and
# yellow on one shape, so no caption or image there shows it.
SUBJECT_CLASS = "circle"
SUBJECT_COLOURS = ("red", "yellow")

# Every word a toy caption uses, plus rare identifiers for subjects: the toy tokenizer makes each one token.
VOCABULARY = ("a", "photo", "of", "on", "and", "background", *PALETTE, *SHAPES, "sks", "zwx", "ohwx")


@dataclass(frozen=True)
class Scene:
    """What one toy image shows: a shape in one colour (or a left and a right colour) at a place and size, on a
    background colour."""

    shape: str
    colours: tuple[str, ...]  # one colour, or the left half's and the right half's
    background: str
    left: int
    top: int
    side: int

    @property
    def colour(self) -> str:
        """How a caption names the shape's colour: `red`, or `red and yellow` for a two-tone shape."""
        return " and ".join(self.colours)

    def caption(self, with_colour: bool = True, with_background: bool = True) -> str:
        """`a photo of a red circle on a blue background`, optionally without the colour or the background."""
        noun = f"{self.colour} {self.shape}" if with_colour else self.shape
        text = f"a photo of a {noun}"
        return f"{text} on a {self.background} background" if with_background else text


def _placement(rng: random.Random) -> tuple[int, int, int]:
    side = rng.randint(24, 36)  # smaller shapes lose their corners in a 16 x 16 latent
    margin = 4
    return rng.randint(margin, SIZE - margin - side), rng.randint(margin, SIZE - margin - side), side


def scene(rng: random.Random) -> Scene:
    """A random pretraining scene: any shape in one colour, or in two that are not the subject's, on another."""
    shape = rng.choice(SHAPES)
    colours = [rng.choice(list(PALETTE))]
    if rng.random() < TWO_TONE_SHARE:
        subject_pair = set(SUBJECT_COLOURS) if colours[0] in SUBJECT_COLOURS else set()
        colours.append(rng.choice([c for c in PALETTE if c != colours[0] and c not in subject_pair]))
    background = rng.choice([c for c in PALETTE if c not in colours])
    return Scene(shape, tuple(colours), background, *_placement(rng))


def subject_scene(rng: random.Random, background: str | None = None) -> Scene:
    """The subject at a random place and size, on `background` or a random colour that is not one of its own."""
    background = background or rng.choice([c for c in PALETTE if c not in SUBJECT_COLOURS])
    return Scene(SUBJECT_CLASS, SUBJECT_COLOURS, background, *_placement(rng))


def _outline(shape: str, box: tuple[int, int, int, int]) -> list[tuple[int, int]] | None:
    x0, y0, x1, y1 = box
    mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "triangle":
        return [(mid_x, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(mid_x, y0), (x1, mid_y), (mid_x, y1), (x0, mid_y)]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_outline(shape, box), fill=fill)


def render(item: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image."""
    scale = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * scale, SIZE * scale), PALETTE[item.background])
    box = (item.left * scale, item.top * scale, (item.left + item.side) * scale - 1, (item.top + item.side) * scale - 1)
    _draw_shape(ImageDraw.Draw(image), item.shape, box, PALETTE[item.colours[0]])
    if len(item.colours) == 2:
        right = Image.new("RGB", image.size, PALETTE[item.background])
        _draw_shape(ImageDraw.Draw(right), item.shape, box, PALETTE[item.colours[1]])
        half = (item.left + item.side / 2) * scale
        image.paste(right.crop((round(half), 0, *image.size)), (round(half), 0))
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)
