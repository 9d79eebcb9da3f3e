"""Draw the demo subject, a small orange toy bear, in six scenes and write them to data/demo/.
The images ship with the project so the demo preset trains on a real-looking folder: mixed sizes,
orientations and formats, one JPEG stored sideways with EXIF orientation 6. Run: python data/make_demo.py
"""

import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "demo"
SUPERSAMPLE = 2
ORIENTATION = 0x0112
FUR, FUR_DARK, MUZZLE, SCARF = (226, 118, 38), (170, 80, 25), (245, 214, 170), (40, 90, 200)


def toy(height: float) -> Image.Image:
    """The subject on a transparent layer `height` px tall: round head with a face, ears, scarf, body."""
    s = height / 3.2
    layer = Image.new("RGBA", (round(2.4 * s), round(height)), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    x, head_y = 1.2 * s, 1.05 * s
    for side in (-1, 1):  # feet, arms, ears
        draw.ellipse((x + side * 0.45 * s - 0.32 * s, 2.85 * s, x + side * 0.45 * s + 0.32 * s, 3.2 * s), FUR_DARK)
        draw.ellipse((x + side * 0.78 * s - 0.2 * s, 1.95 * s, x + side * 0.78 * s + 0.2 * s, 2.65 * s), FUR_DARK)
        ear = (x + side * 0.62 * s, head_y - 0.72 * s)
        draw.ellipse((ear[0] - 0.3 * s, ear[1] - 0.3 * s, ear[0] + 0.3 * s, ear[1] + 0.3 * s), FUR)
        draw.ellipse((ear[0] - 0.15 * s, ear[1] - 0.15 * s, ear[0] + 0.15 * s, ear[1] + 0.15 * s), (240, 160, 150))
    draw.ellipse((x - 0.7 * s, 1.7 * s, x + 0.7 * s, 3.0 * s), FUR)
    draw.ellipse((x - 0.4 * s, 2.0 * s, x + 0.4 * s, 2.8 * s), MUZZLE)
    draw.ellipse((x - 0.9 * s, head_y - 0.95 * s, x + 0.9 * s, head_y + 0.95 * s), FUR)
    draw.ellipse((x - 0.68 * s, head_y - 0.62 * s, x + 0.68 * s, head_y + 0.78 * s), MUZZLE)
    eye_y = head_y - 0.22 * s
    for side in (-1, 1):
        eye_x = x + side * 0.3 * s
        draw.rectangle((eye_x - 0.2 * s, eye_y - 0.22 * s, eye_x + 0.2 * s, eye_y - 0.15 * s), (70, 40, 20))
        draw.ellipse((eye_x - 0.14 * s, eye_y - 0.08 * s, eye_x + 0.14 * s, eye_y + 0.08 * s), (30, 20, 20))
    draw.polygon([(x, eye_y), (x - 0.09 * s, head_y + 0.2 * s), (x + 0.09 * s, head_y + 0.2 * s)], (210, 150, 110))
    draw.ellipse((x - 0.25 * s, head_y + 0.38 * s, x + 0.25 * s, head_y + 0.52 * s), (150, 50, 50))
    draw.rounded_rectangle((x - 0.75 * s, 1.78 * s, x + 0.75 * s, 2.0 * s), radius=0.1 * s, fill=SCARF)
    draw.rectangle((x + 0.3 * s, 1.9 * s, x + 0.5 * s, 2.45 * s), SCARF)
    return layer


def gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    """A vertical colour gradient, the sky or wall of a scene."""
    column = Image.linear_gradient("L").resize((1, size[1]))
    return Image.composite(Image.new("RGB", (1, size[1]), bottom), Image.new("RGB", (1, size[1]), top), column).resize(
        size
    )


def park(size: tuple[int, int], rng: random.Random) -> Image.Image:
    scene = gradient(size, (110, 170, 235), (200, 225, 245))
    draw = ImageDraw.Draw(scene)
    width, height = size
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0.05, 0.3) * height
        for dx in (-0.06, 0, 0.06):
            r = rng.uniform(0.04, 0.07) * width
            draw.ellipse((cx + dx * width - r, cy - r * 0.6, cx + dx * width + r, cy + r * 0.6), (250, 250, 250))
    draw.ellipse((-0.3 * width, 0.55 * height, 1.3 * width, 1.6 * height), (80, 160, 70))
    return scene


def shelf(size: tuple[int, int], rng: random.Random) -> Image.Image:
    scene = Image.new("RGB", size, (236, 226, 200))
    draw = ImageDraw.Draw(scene)
    width, height = size
    for x in range(0, width, max(1, width // 12)):
        draw.rectangle((x, 0, x + width // 36, height), (222, 205, 175))
    draw.rectangle((0, 0.72 * height, width, 0.78 * height), (140, 95, 55))
    for i in range(4):  # books
        left, top = (0.05 + 0.07 * i) * width, rng.uniform(0.5, 0.58) * height
        colour = rng.choice([(160, 40, 50), (40, 110, 80), (50, 70, 140), (200, 160, 40)])
        draw.rectangle((left, top, left + 0.06 * width, 0.72 * height), colour)
    return scene


def beach(size: tuple[int, int], rng: random.Random) -> Image.Image:
    scene = gradient(size, (80, 150, 225), (180, 215, 240))
    draw = ImageDraw.Draw(scene)
    width, height = size
    draw.rectangle((0, 0.45 * height, width, 0.62 * height), (30, 110, 170))
    draw.rectangle((0, 0.62 * height, width, height), (235, 210, 150))
    sun = (rng.uniform(0.6, 0.85) * width, 0.15 * height)
    draw.ellipse(
        (sun[0] - 0.06 * width, sun[1] - 0.06 * width, sun[0] + 0.06 * width, sun[1] + 0.06 * width), (255, 230, 120)
    )
    return scene


def kitchen(size: tuple[int, int], rng: random.Random) -> Image.Image:
    scene = gradient(size, (250, 240, 215), (215, 200, 170))
    draw = ImageDraw.Draw(scene)
    width, height = size
    cell = width // 16
    for row, y in enumerate(range(int(0.6 * height), height, cell // 2)):
        for col, x in enumerate(range(0, width, cell)):
            if (row + col) % 2:
                draw.rectangle((x, y, x + cell, y + cell // 2), (200, 60, 60))
            else:
                draw.rectangle((x, y, x + cell, y + cell // 2), (245, 245, 240))
    mug = (rng.uniform(0.05, 0.2) * width, 0.42 * height)
    draw.rounded_rectangle((mug[0], mug[1], mug[0] + 0.1 * width, mug[1] + 0.2 * height), 8, (70, 130, 160))
    return scene


def night(size: tuple[int, int], rng: random.Random) -> Image.Image:
    scene = gradient(size, (15, 20, 60), (70, 60, 110))
    draw = ImageDraw.Draw(scene)
    width, height = size
    for _ in range(60):
        x, y, r = rng.uniform(0, width), rng.uniform(0, 0.6 * height), rng.uniform(1, 3) * SUPERSAMPLE
        draw.ellipse((x - r, y - r, x + r, y + r), (255, 250, 220))
    draw.rectangle((0, 0.8 * height, width, height), (40, 50, 40))
    return scene


def snow(size: tuple[int, int], rng: random.Random) -> Image.Image:
    scene = gradient(size, (190, 205, 225), (235, 240, 248))
    draw = ImageDraw.Draw(scene)
    width, height = size
    draw.ellipse((-0.4 * width, 0.62 * height, 1.4 * width, 1.7 * height), (250, 252, 255))
    for _ in range(3):  # pine trees
        x, base = rng.uniform(0.55, 0.95) * width, rng.uniform(0.6, 0.7) * height
        draw.polygon([(x, base - 0.35 * height), (x - 0.08 * width, base), (x + 0.08 * width, base)], (40, 100, 60))
    return scene


# (file, size as seen upright, background, toy height and position as fractions, tilt in degrees, save options)
SCENES = [
    ("toy_01_park.jpg", (640, 480), park, 0.62, (0.35, 0.62), -6, {"format": "JPEG", "quality": 88}),
    ("toy_02_shelf.png", (480, 640), shelf, 0.34, (0.68, 0.56), 4, {"format": "PNG", "optimize": True}),
    ("toy_03_beach.webp", (800, 800), beach, 0.75, (0.5, 0.6), 0, {"format": "WEBP", "quality": 85}),
    ("toy_04_kitchen.jpg", (1000, 750), kitchen, 0.5, (0.66, 0.52), 8, {"format": "JPEG", "quality": 85}),
    ("toy_05_night_sideways.jpg", (512, 768), night, 0.55, (0.45, 0.6), -3, {"format": "JPEG", "quality": 88}),
    ("toy_06_snow.png", (720, 720), snow, 0.45, (0.3, 0.66), 10, {"format": "PNG", "optimize": True}),
]


def render(
    size: tuple[int, int],
    background: Callable[[tuple[int, int], random.Random], Image.Image],
    toy_height: float,
    centre: tuple[float, float],
    tilt: float,
    rng: random.Random,
) -> Image.Image:
    """One upright scene, drawn SUPERSAMPLE times larger and reduced for smooth edges."""
    big = (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE)
    scene = background(big, rng)
    subject = toy(toy_height * big[1]).rotate(tilt, Image.Resampling.BICUBIC, expand=True)
    position = (round(centre[0] * big[0] - subject.width / 2), round(centre[1] * big[1] - subject.height / 2))
    scene.paste(subject, position, subject)
    return scene.resize(size, Image.Resampling.LANCZOS)


def main() -> None:
    rng = random.Random(7)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, size, background, toy_height, centre, tilt, options in SCENES:
        image = render(size, background, toy_height, centre, tilt, rng)
        if "sideways" in name:  # stored as a phone held sideways writes it; EXIF says how to turn it upright
            exif = Image.Exif()
            exif[ORIENTATION] = 6
            image.rotate(90, expand=True).save(OUT / name, exif=exif, **options)
        else:
            image.save(OUT / name, **options)
        print(f"{name}: {(OUT / name).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
