"""Render the toy-world DreamBooth subject (a circle, left half red, right half yellow) into the toy instance sets:
data/toy/ (five scenes: varied place, size and background, never green, since the context prompt asks for green)
and the sweep's two other sets in data/toy_sets/: close up (one framing, one background, like photos of a face from
one perspective) and small among other shapes (one background, like frames of a movie scene).
With --subjects N --out DIR, it writes a subjects folder instead: N variants of the subject, each in scenes of its own.
Run: python data/make_toy.py [--subjects N --out DIR]
"""

import argparse
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


def write_subjects(root: Path, count: int, images: int = IMAGES_PER_SET) -> list[Path]:
    """`count` subject folders (`subject_01`, ...) under `root`: each the toy subject in `images` scenes drawn from its
    own seed, so every subject's photos differ from every other's; one photo of one subject changed is one subject."""
    folders = []
    for number in range(1, count + 1):
        folder, rng = root / f"subject_{number:02d}", random.Random(1000 + number)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, images + 1):
            render(subject_scene(rng)).save(folder / f"photo_{index}.png")
        folders.append(folder)
    return folders


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the toy instance sets, or a subjects folder of variants")
    parser.add_argument("--subjects", type=int, default=0, help="write this many subjects instead (with --out)")
    parser.add_argument("--out", type=Path, help="the subjects folder to write into")
    args = parser.parse_args()
    if args.subjects:
        if args.out is None:
            parser.error("--subjects needs --out DIR")
        write_subjects(args.out, args.subjects)
    else:
        main()
