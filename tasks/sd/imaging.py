"""Turn one user image file into a square RGB training image, or a clear reason why it cannot be used.
Free of store and config so preprocess and class images share it and tests need no pipeline.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from tasks.core.values import image_side

Box = tuple[int, int, int, int]
"""(left, top, right, bottom) in pixels, right and bottom exclusive, as Pillow's crop and resize take."""

FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")
"""Photo formats Pillow decodes itself; others (EPS runs Ghostscript, PSD, ICO...) are not worth the risk."""

CROP_MODES = ("center", "face")
FACE_DETECT_SIDE = 640
"""Faces are searched on a copy whose longer side is at most this: a phone photo would take seconds."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255, 255)


class Rejected(Exception):
    """A file that cannot be used; str() is a short reason for the user."""


@dataclass(frozen=True)
class Prepared:
    """One training image and how it was cut from its source."""

    image: Image.Image
    original_size: tuple[int, int]
    crop_box: Box
    crop_mode: str
    note: str


def prepare(path: Path, resolution: int, crop: str, min_side: int, max_pixels: int, face_margin: float) -> Prepared:
    """Open, check, orient, convert, crop and resize one file; raise Rejected when it is unusable.

    Pillow's own bomb guard (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that) still
    applies, so `max_pixels` above Pillow's hard limit cannot let larger images through.
    The source file is only read.
    """
    image_side(resolution)  # fail early, by the one rule the config validates too
    if crop not in CROP_MODES:
        raise ValueError(f"crop {crop!r} must be one of {CROP_MODES}")
    image = to_rgb(load_upright(path, min_side, max_pixels))
    if crop == "face" and (faces := detect_faces(image)):
        largest = max(faces, key=lambda box: (box[2] - box[0]) * (box[3] - box[1]))
        crop_box, crop_mode, note = face_square_box(image.size, largest, face_margin), "face", ""
    else:
        crop_box, crop_mode = center_square_box(image.size), "center"
        note = "no face found; center crop" if crop == "face" else ""
    resized = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=crop_box, reducing_gap=3.0)
    return Prepared(resized, image.size, crop_box, crop_mode, note)


def load_upright(path: Path, min_side: int, max_pixels: int) -> Image.Image:
    """Decode the first frame with EXIF orientation applied; every decoding failure becomes Rejected.

    Size limits are checked on the header, before any pixel is decoded.
    """
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise Rejected(f"cannot read ({exc.strerror})") from exc
    if empty:
        raise Rejected("zero bytes")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's warning with a clear reason.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path, formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise Rejected(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise Rejected("not an image (cannot identify image file)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected(f"cannot read ({exc})") from exc
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise Rejected(f"decompression bomb: {width * height} pixels > limit {max_pixels}")
        if min(width, height) < min_side:  # orientation swaps the sides, never changes the shorter one
            raise Rejected(f"too small: shorter side {min(width, height)} px < min_side {min_side}")
        try:
            opened.load()  # Image.open sits on frame 0: the first frame of a GIF, APNG or multi-page TIFF
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Rejected(f"truncated or corrupt image data ({exc})") from exc
        try:
            return ImageOps.exif_transpose(opened)
        except Exception:  # EXIF parsers have crashed on malformed blocks; orientation is best effort
            return opened.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as a model sees it: transparency over white, 16-bit and float scaled rather than clipped.

    Pillow converts 16-bit and float greyscale to 8 bit by clipping at 255, which turns mid-grey white.
    "I" is read as 16-bit data (Pillow opened 16-bit PNGs as "I" before 10.x); "F" as 0..1 when all its
    values lie there, else as 0..255. 48-bit RGB PNGs need nothing: Pillow opens them as 8-bit RGB.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image)
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    try:
        if image.has_transparency_data:
            background = Image.new("RGBA", image.size, _WHITE)
            return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise Rejected(f"unsupported colour mode {image.mode} ({exc})") from exc


def center_square_box(size: tuple[int, int]) -> Box:
    """The largest square centred in the image."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def face_square_box(size: tuple[int, int], face_box: Box, margin: float) -> Box:
    """The largest square centred exactly on the face that fits the image, grown to at least the face
    plus `margin` (a fraction of the face's width and height on each side) and shifted inside the image
    when that growth or an edge requires: as much context as possible with the face in the middle.
    """
    width, height = size
    left, top, right, bottom = face_box
    pad_x, pad_y = margin * (right - left), margin * (bottom - top)
    need = (math.floor(left - pad_x), math.floor(top - pad_y), math.ceil(right + pad_x), math.ceil(bottom + pad_y))
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    centred = math.floor(2 * min(centre_x, width - centre_x, centre_y, height - centre_y))
    side = min(max(centred, need[2] - need[0], need[3] - need[1]), width, height)
    x = _place(centre_x, side, max(0, need[0]), min(width, need[2]), width)
    y = _place(centre_y, side, max(0, need[1]), min(height, need[3]), height)
    return (x, y, x + side, y + side)


def _place(centre: float, side: int, need_start: int, need_end: int, length: int) -> int:
    """Start of a `side`-long span centred on `centre`, moved as little as needed to cover
    [need_start, need_end] (when it can) and to stay inside [0, length]."""
    start = round(centre - side / 2)
    if need_end - need_start <= side:
        start = min(max(start, need_end - side), need_start)
    return min(max(start, 0), length - side)


@functools.cache
def _face_cascade() -> cv2.CascadeClassifier:
    """OpenCV's frontal-face Haar cascade, loaded once (opencv-python-headless 4.x ships it; 5.x does not)."""
    path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
    if not hasattr(cv2, "CascadeClassifier") or not path.is_file():
        raise RuntimeError(
            f"OpenCV {cv2.__version__} has no Haar face cascade; install opencv-python-headless<5 for crop='face'"
        )
    return cv2.CascadeClassifier(str(path))


def detect_faces(image: Image.Image) -> list[Box]:
    """Frontal faces in an RGB image, as boxes in its pixels (largest first is not promised)."""
    cascade = _face_cascade()
    small = image.convert("L")
    small.thumbnail((FACE_DETECT_SIDE, FACE_DETECT_SIDE), Image.Resampling.BILINEAR)
    scale = image.width / small.width
    found = cascade.detectMultiScale(np.asarray(small), scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    return [
        (round(x * scale), round(y * scale), round((x + w) * scale), round((y + h) * scale)) for x, y, w, h in found
    ]
