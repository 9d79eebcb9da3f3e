"""Render the toy-world DreamBooth subject (a circle, left half red, right half yellow) into the toy instance sets:
data/toy/ (five scenes: varied place, size and background, never green, since the context prompt asks for green)
and the sweep's two other sets in data/toy_sets/: close up (one framing, one background, like photos of a face from
one perspective) and small among other shapes (one background, like frames of a movie scene).
Run: python data/make_toy.py
"""

import random
from pathlib import Path

from PIL import Image, ImageChops

from tasks.toy.world import PALETTE, SHAPES, SIZE, SUBJECT_CLASS, SUBJECT_COLOURS, Scene, render, subject_scene

HERE = Path(__file__).resolve().parent
BACKGROUNDS = ("blue", "black", "white", "blue", "black")
IMAGES_PER_SET = 5


def close_up(rng: random.Random) -> Image.Image:
    """The subject filling the frame, centred within a few pixels, always on blue."""
    side = rng.randint(50, 54)
    left, top = ((SIZE - side) // 2 + rng.randint(-2, 2) for _ in range(2))
    return render(Scene(SUBJECT_CLASS, SUBJECT_COLOURS, "blue", left, top, side))


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int], gap: int = 3) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax < bx + bside + gap and bx < ax + aside + gap and ay < by + bside + gap and by < ay + aside + gap


def among_shapes(rng: random.Random) -> Image.Image:
    """The subject at its smallest beside two other one-colour shapes, on white: a busy frame of one scene."""
    background = "white"
    boxes = [(rng.randint(2, SIZE - 26), rng.randint(2, SIZE - 26), 24)]
    while len(boxes) < 3:
        side = rng.randint(12, 16)
        box = (rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2), side)
        if not any(_overlaps(box, other) for other in boxes):
            boxes.append(box)
    image = render(Scene(SUBJECT_CLASS, SUBJECT_COLOURS, background, *boxes[0]))
    colours = [c for c in PALETTE if c not in (*SUBJECT_COLOURS, background)]
    plain = Image.new("RGB", image.size, PALETTE[background])
    for box in boxes[1:]:
        shape = render(Scene(rng.choice(SHAPES[1:]), (rng.choice(colours),), background, *box))
        image.paste(shape, mask=ImageChops.difference(shape, plain).convert("L").point(lambda v: 255 if v else 0))
    return image


def main() -> None:
    (HERE / "toy").mkdir(exist_ok=True)
    rng = random.Random(7)
    for index, background in enumerate(BACKGROUNDS, start=1):
        render(subject_scene(rng, background)).save(HERE / "toy" / f"subject_{index}_{background}.png")
    for name, draw, seed in (("close_up", close_up, 11), ("among_shapes", among_shapes, 13)):
        folder, rng = HERE / "toy_sets" / name, random.Random(seed)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, IMAGES_PER_SET + 1):
            draw(rng).save(folder / f"{name}_{index}.png")


if __name__ == "__main__":
    main()
