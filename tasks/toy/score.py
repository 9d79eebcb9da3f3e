"""The toy world's analyser: what a (generated) image shows, in closed form, and whether it matches a prompt.

Background: the median colour of the border ring. Foreground: the largest connected region that differs from it.
Colours are the palette colour most of a region's pixels are nearest to; a shape whose left and right halves each
show mostly another colour is two-tone (`red and yellow`). The shape comes from how much of its bounding box the
region fills and where its centre of mass sits. The subject is a circle, left half red and right half yellow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from tasks.toy.world import PALETTE, SHAPES, SIZE, SUBJECT_CLASS, SUBJECT_COLOURS, Scene

_NAMES = list(PALETTE)
_COLOURS = np.array([PALETTE[name] for name in _NAMES], dtype=np.float32)
_BORDER = 3  # px of the ring that the background colour is read from; shapes keep a 4 px margin
_FOREGROUND_DISTANCE = 90.0  # RGB distance from the background above which a pixel belongs to the foreground
_MIN_AREA = 40  # px: a smaller region is noise, not a shape (the smallest toy shape covers ~290)
_HALF_SHARE = 0.6  # each half of a two-tone shape must be at least this much its own colour
VERSION = 2  # part of the report's cache key when it scores with this analyser: bump when a reading changes


@dataclass(frozen=True)
class Reading:
    """What the analyser sees in one image; a field is "" when there is nothing to read."""

    background: str
    colour: str  # as a caption names it: `red`, or `red and yellow` for a two-tone shape
    shape: str

    @property
    def subject(self) -> bool:
        """The subject: a circle with its left half and right half in the subject's two colours."""
        return self.shape == SUBJECT_CLASS and self.colour == " and ".join(SUBJECT_COLOURS)

    def shows(self, item: Scene) -> dict[str, bool]:
        """Whether the image shows the scene's colour, background and shape."""
        return {name: getattr(self, name) == getattr(item, name) for name in ("colour", "background", "shape")}


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB row."""
    return np.argmin(((pixels[:, None, :] - _COLOURS[None]) ** 2).sum(-1), axis=1)


def _dominant(pixels: np.ndarray) -> tuple[str, float]:
    """The palette colour most pixels are nearest to, and the share of pixels nearest to it."""
    if not len(pixels):
        return "", 0.0
    counts = np.bincount(_nearest(pixels), minlength=len(_NAMES))
    best = int(counts.argmax())
    return _NAMES[best], float(counts[best] / len(pixels))


def _shape(mask: np.ndarray) -> str:
    """Circle, square, triangle or diamond from the region's fill of its bounding box and its mass centre."""
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (height * width)
    centre_drop = (ys.mean() - (ys.min() + ys.max()) / 2) / height  # triangles (apex up) are heavier below
    if fill > 0.89:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle" if centre_drop > 0.08 else "diamond"


def read(image: Image.Image) -> Reading:
    """Analyse one image (any size; it is read at 64 x 64)."""
    rgb = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    ring = np.ones((SIZE, SIZE), bool)
    ring[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    background_rgb = np.median(rgb[ring], axis=0)
    background = _NAMES[int(_nearest(background_rgb[None])[0])]
    differs = (np.linalg.norm(rgb - background_rgb, axis=-1) > _FOREGROUND_DISTANCE).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(differs, connectivity=8)
    if count < 2 or stats[1:, cv2.CC_STAT_AREA].max() < _MIN_AREA:
        return Reading(background, "", "")
    mask = labels == 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    # The colour is read inside the region, away from its anti-aliased rim.
    core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    core = core if core.sum() >= _MIN_AREA // 2 else mask
    xs = np.nonzero(mask)[1]
    middle = (xs.min() + xs.max()) / 2
    columns = np.arange(SIZE)[None, :]
    left, left_share = _dominant(rgb[core & (columns < middle - 1)])
    right, right_share = _dominant(rgb[core & (columns > middle + 1)])
    two_tone = left != right and min(left_share, right_share) >= _HALF_SHARE
    colour = f"{left} and {right}" if two_tone else _dominant(rgb[core])[0]
    return Reading(background, colour, _shape(mask))


_COLOUR_WORD = "|".join(PALETTE)
_CAPTION = re.compile(
    rf"\b(?:(?P<colour>(?:{_COLOUR_WORD})(?: and (?:{_COLOUR_WORD}))?) )?(?P<shape>{'|'.join(SHAPES)})\b"
    rf"(?: on an? (?P<background>{'|'.join(PALETTE)}) background\b)?"
)


@dataclass(frozen=True)
class Asked:
    """What a prompt asks for: any of colour (`red`, `red and yellow`), shape and background ("" where the prompt
    leaves it open)."""

    colour: str
    shape: str
    background: str


def parse(prompt: str) -> Asked:
    """The colour, shape and background words of a toy prompt such as `a photo of a red circle on a blue ...`."""
    match = _CAPTION.search(prompt)
    if not match:
        return Asked("", "", "")
    return Asked(match["colour"] or "", match["shape"], match["background"] or "")


def matches(reading: Reading, asked: Asked) -> dict[str, bool]:
    """For each attribute the prompt names, whether the image shows it; and `all` of them at once (absent when
    the prompt names none, as there is nothing to check)."""
    checks = {
        name: getattr(reading, name) == getattr(asked, name)
        for name in ("colour", "shape", "background")
        if getattr(asked, name)
    }
    return checks | {"all": all(checks.values())} if checks else {}
