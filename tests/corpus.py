"""Builders of real image folders on disk, each returning the outcome every file is documented to get.
Stage tests assert those outcomes file by file; imaging tests read the special files by the names below.

Outcomes: "ok", "ignored" (sidecars, hidden files), or "rejected:<keyword>" where the keyword appears in
the reason. The expectations assume the limits MIN_SIDE and MAX_PIXELS.
"""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MIN_SIDE = 256
MAX_PIXELS = 40_000_000
ORIENTATION = 0x0112
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 170, 0)

# build_user_folder: files whose decoded content tests check.
USER_UPPERCASE_JPG = "holiday pics/Zoë at the beach.JPG"
USER_EXIF6 = "portraits/sideways phone shot.jpg"
"""Stored 480x360 and sideways with EXIF Orientation 6; upright it is 360x480, red top half, blue bottom."""
USER_CMYK = "scans/cmyk print.jpg"
"""CMYK JPEG 400x320: left half CMYK (0, 255, 255, 0) = red, right half (255, 0, 0, 0) = cyan."""
USER_GREY16 = "scans/film scan 16bit.png"
"""16-bit greyscale PNG 320x400: top half 32768 (8-bit 128), bottom half 16384 (8-bit 64)."""
USER_RGBA = "stickers/sticker with transparency.png"
"""RGBA PNG 400x400: fully transparent black background, opaque green disc of radius 100 in the middle."""

USER_FOLDER = {
    USER_UPPERCASE_JPG: "ok",
    "holiday pics/Zoë at the beach.txt": "ignored",
    "holiday pics/._Zoë at the beach.JPG": "ignored",
    "holiday pics/dinner/toast (2).jpeg": "ok",
    USER_EXIF6: "ok",
    "portraits/sideways phone shot.txt": "ignored",
    USER_CMYK: "ok",
    USER_GREY16: "ok",
    USER_RGBA: "ok",
    "stickers/palette.gif": "ok",
    "misc/café.webp": "ok",
    "misc/old scanner.bmp": "ok",
    "misc/archive.tiff": "ok",
    ".DS_Store": "ignored",
}

# build_broken_corpus
BROKEN_ANIMATED = "animated.gif"
"""Two frames, 320x320: the first red, the second blue."""
BROKEN_OUTSIDE_TARGET = "elsewhere.jpg"
"""The valid image that outside_link.jpg points to, in the folder `<root>.outside` beside root."""

BROKEN_CORPUS = {
    "empty.jpg": "rejected:zero bytes",
    "notes.png": "rejected:not an image",
    "truncated.jpg": "rejected:truncated",
    "corrupt.png": "rejected:corrupt",
    "bomb.png": "rejected:decompression bomb",
    "bomb huge.png": "rejected:decompression bomb",
    "tiny.png": "rejected:too small",
    "sunset.jpg": "ok",
    "sunset_copy.jpg": "rejected:duplicate",
    "sunset_link.jpg": "rejected:duplicate",
    "outside_link.jpg": "rejected:symlink",
    "dangling_link.jpg": "rejected:symlink",
    BROKEN_ANIMATED: "ok",
    "broken exif.jpg": "ok",
    "sunset.txt": "ignored",
    ".DS_Store": "ignored",
}
STAGE_LEVEL = ("rejected:duplicate", "rejected:symlink")
"""Outcomes only the preprocess stage can decide: imaging.prepare sees one file at a time."""


def build_user_folder(root: Path) -> dict[str, str]:
    """A folder like a real user's: subfolders, unicode and spaces in names, every format and colour mode
    a phone, scanner or web download gives, caption sidecars and macOS litter. All images are distinct
    and at least 320 px on the shorter side.
    """
    sideways = _halves((360, 480), RED, BLUE, vertical=True).rotate(90, expand=True)  # upright after EXIF 6
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    sideways.save(_new(root / USER_EXIF6), "JPEG", quality=95, exif=exif)

    cmyk = Image.new("CMYK", (400, 320), (0, 255, 255, 0))
    cmyk.paste((255, 0, 0, 0), (200, 0, 400, 320))
    cmyk.save(_new(root / USER_CMYK), "JPEG", quality=95)

    grey16 = np.full((400, 320), 32768, np.uint16)
    grey16[200:] = 16384
    Image.fromarray(grey16).save(_new(root / USER_GREY16), "PNG")

    sticker = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    ImageDraw.Draw(sticker).ellipse((100, 100, 300, 300), fill=(*GREEN, 255))
    sticker.save(_new(root / USER_RGBA), "PNG")

    _photo((640, 480), seed=1).save(_new(root / USER_UPPERCASE_JPG), "JPEG", quality=90)
    _photo((480, 640), seed=2).save(_new(root / "holiday pics/dinner/toast (2).jpeg"), "JPEG", quality=90)
    _photo((360, 360), seed=3).quantize(64).save(_new(root / "stickers/palette.gif"), "GIF")
    _photo((500, 375), seed=4).save(_new(root / "misc/café.webp"), "WEBP", quality=85)
    _photo((330, 330), seed=5).save(_new(root / "misc/old scanner.bmp"), "BMP")
    _photo((480, 360), seed=6).save(_new(root / "misc/archive.tiff"), "TIFF", compression="tiff_lzw")

    _write(root / "holiday pics/Zoë at the beach.txt", "a photo of sks toy with Zoë on the beach\n".encode())
    _write(root / "portraits/sideways phone shot.txt", b"a photo of sks toy, portrait\n")
    _write(root / "holiday pics/._Zoë at the beach.JPG", b"\x00\x05\x16\x07" + bytes(80))  # AppleDouble
    _write(root / ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(60))
    return dict(USER_FOLDER)


def build_broken_corpus(root: Path) -> dict[str, str]:
    """Every way a file can be unusable, beside valid files that look suspicious but are fine.

    Duplicates: the stage keeps the first file in sorted relative-path order, so sunset.jpg is kept and
    sunset_copy.jpg rejected. Symlinks: a link whose target lies outside the folder (or nowhere) is
    rejected:symlink, so a dataset never reads beyond its folder; a link to a file inside the folder is a
    second name for bytes already in the set, so it is rejected:duplicate and the real file keeps its
    place (its name also sorts after the target's). Also writes `<root>.outside/` beside root, which
    holds outside_link.jpg's target.
    """
    sunset = _jpeg_bytes(_photo((480, 320), seed=10))
    _write(root / "sunset.jpg", sunset)
    _write(root / "sunset_copy.jpg", sunset)
    (root / "sunset_link.jpg").symlink_to("sunset.jpg")
    outside = root.parent / f"{root.name}.outside" / BROKEN_OUTSIDE_TARGET
    _photo((400, 400), seed=11).save(_new(outside), "JPEG")
    (root / "outside_link.jpg").symlink_to(os.path.relpath(outside, root))
    (root / "dangling_link.jpg").symlink_to("nowhere.jpg")

    _write(root / "empty.jpg", b"")
    _write(root / "notes.png", b"shopping list: eggs, milk, film for the camera\n")
    noisy = np.random.default_rng(12).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    whole = _jpeg_bytes(Image.fromarray(noisy))
    _write(root / "truncated.jpg", whole[: len(whole) // 2])
    garbage = np.random.default_rng(13).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    _write(root / "corrupt.png", _png_bytes((320, 320), bit_depth=8, colour_type=2, idat=garbage))
    # Headers claiming 1-bit giants: 100 M pixels trips MAX_PIXELS only, 900 M also Pillow's own hard limit.
    tiny_idat = zlib.compress(bytes(64))
    _write(root / "bomb.png", _png_bytes((10_000, 10_000), bit_depth=1, colour_type=0, idat=tiny_idat))
    _write(root / "bomb huge.png", _png_bytes((30_000, 30_000), bit_depth=1, colour_type=0, idat=tiny_idat))
    _photo((200, 150), seed=14).save(_new(root / "tiny.png"), "PNG")

    frames = [Image.new("RGB", (320, 320), colour) for colour in (RED, BLUE)]
    frames[0].save(_new(root / BROKEN_ANIMATED), "GIF", save_all=True, append_images=frames[1:], duration=100)
    # An EXIF block that promises a 16-byte Orientation value and then ends.
    broken_exif = b"Exif\x00\x00II*\x00" + struct.pack("<IHHHII", 8, 1, ORIENTATION, 3, 8, 255)
    _photo((360, 300), seed=15).save(_new(root / "broken exif.jpg"), "JPEG", exif=broken_exif)

    _write(root / "sunset.txt", b"a photo of sks toy at sunset\n")
    _write(root / ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(60))
    return dict(BROKEN_CORPUS)


def face_image(size: tuple[int, int], centre: tuple[int, int], radius: int) -> Image.Image:
    """A flat cartoon face (skin oval, brows, dark eyes, nose, mouth) that OpenCV's frontal-face Haar
    cascade detects; the oval spans centre +- radius wide and +- 1.25 radius tall."""
    image = Image.new("RGB", size, (120, 160, 200))
    draw = ImageDraw.Draw(image)
    x, y, r = centre[0], centre[1], radius
    draw.ellipse((x - r, y - 1.25 * r, x + r, y + 1.25 * r), fill=(230, 190, 160))
    eye_y = y - 0.3 * r
    for side in (-1, 1):
        eye_x = x + side * 0.42 * r
        brow = (eye_x - 0.28 * r, eye_y - 0.3 * r, eye_x + 0.28 * r, eye_y - 0.2 * r)
        draw.rectangle(brow, fill=(60, 40, 30))
        draw.ellipse((eye_x - 0.2 * r, eye_y - 0.1 * r, eye_x + 0.2 * r, eye_y + 0.1 * r), fill=(40, 30, 30))
    draw.polygon([(x, eye_y), (x - 0.12 * r, y + 0.3 * r), (x + 0.12 * r, y + 0.3 * r)], fill=(215, 170, 140))
    draw.ellipse((x - 0.35 * r, y + 0.5 * r, x + 0.35 * r, y + 0.7 * r), fill=(150, 60, 60))
    return image


def _photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth random colour blobs: distinct per seed, photo-like enough for every codec."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def _halves(
    size: tuple[int, int], first: tuple[int, int, int], second: tuple[int, int, int], vertical: bool
) -> Image.Image:
    """`first` colour on the top (vertical) or left half, `second` on the other."""
    image = Image.new("RGB", size, first)
    width, height = size
    image.paste(second, (0, height // 2, width, height) if vertical else (width // 2, 0, width, height))
    return image


def _png_bytes(size: tuple[int, int], bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG with a valid signature, header and checksums around whatever IDAT payload is given."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", *size, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _new(path: Path) -> Path:
    """`path`, with its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(path: Path, data: bytes) -> None:
    _new(path).write_bytes(data)
