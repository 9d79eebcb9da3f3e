"""Render the toy-world DreamBooth subject (a circle, left half red, right half yellow) in five scenes into
data/toy/: varied place, size and background, never green (the context prompt asks for green).
Run: python data/make_toy.py
"""

import random
from pathlib import Path

from tasks.toy.world import render, subject_scene

OUT = Path(__file__).resolve().parent / "toy"
BACKGROUNDS = ("blue", "black", "white", "blue", "black")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = random.Random(7)
    for index, background in enumerate(BACKGROUNDS, start=1):
        render(subject_scene(rng, background)).save(OUT / f"subject_{index}_{background}.png")


if __name__ == "__main__":
    main()
