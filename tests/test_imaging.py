import contextlib
import hashlib
from pathlib import Path

import corpus
import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.core.values import image_side
from tasks.sd import imaging
from tasks.sd.imaging import Rejected, center_square_box, face_square_box, prepare, to_rgb

# "broken exif.jpg" has a broken EXIF block on purpose; Pillow warns while reading it.
pytestmark = pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")
RESOLUTION = 128


def run(path: Path, crop: str = "center", face_margin: float = 0.5) -> imaging.Prepared:
    return prepare(path, RESOLUTION, crop, corpus.MIN_SIDE, corpus.MAX_PIXELS, face_margin)


def pixels(prepared: imaging.Prepared) -> np.ndarray:
    return np.asarray(prepared.image, dtype=np.float64)


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "user"
    corpus.build_user_folder(root)
    return root


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "broken"
    corpus.build_broken_corpus(root)
    return root


def test_every_usable_file_becomes_an_rgb_square_of_the_resolution(user: Path, broken: Path) -> None:
    expected = {user / rel: outcome for rel, outcome in corpus.USER_FOLDER.items()}
    expected |= {broken / rel: outcome for rel, outcome in corpus.BROKEN_CORPUS.items()}
    usable = [path for path, outcome in expected.items() if outcome == "ok"]
    assert len(usable) == 13
    for path in usable:
        prepared = run(path)
        assert (prepared.image.mode, prepared.image.size) == ("RGB", (RESOLUTION, RESOLUTION)), path
        left, top, right, bottom = prepared.crop_box
        assert right - left == bottom - top == min(prepared.original_size), path


def test_sideways_phone_shot_comes_out_upright(user: Path) -> None:
    prepared = run(user / corpus.USER_EXIF6)
    assert prepared.original_size == (360, 480)  # stored 480x360; upright only after EXIF orientation 6
    top, bottom = pixels(prepared)[:60], pixels(prepared)[-60:]
    assert np.abs(top - corpus.RED).max() < 12
    assert np.abs(bottom - corpus.BLUE).max() < 12


def test_cmyk_jpeg_keeps_its_colours(user: Path) -> None:
    out = pixels(run(user / corpus.USER_CMYK))
    # center crop of 400x320 keeps x 40..360: red until source x 200, i.e. output x < 64
    assert np.abs(out[:, :56] - corpus.RED).max() < 12
    assert np.abs(out[:, 72:] - (0, 255, 255)).max() < 12


def test_16_bit_grey_png_is_scaled_not_clipped(user: Path) -> None:
    with Image.open(user / corpus.USER_GREY16) as source:
        assert source.mode == "I;16"  # what Pillow 13 gives; its own convert("L") would clip this to 255
    out = pixels(run(user / corpus.USER_GREY16))
    assert np.abs(out[:56] - 128).max() <= 1
    assert np.abs(out[-56:] - 64).max() <= 1


def test_transparent_pixels_become_white(user: Path) -> None:
    out = pixels(run(user / corpus.USER_RGBA))
    assert np.abs(out[:16, :16] - 255).max() == 0  # transparent black in the source
    assert np.abs(out[56:72, 56:72] - corpus.GREEN).max() < 2


def test_48_bit_png_is_opened_as_8_bit_rgb(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), np.full((300, 300, 3), (10000, 30000, 50000), np.uint16))  # BGR
    with Image.open(path) as source:
        assert source.mode == "RGB"
    assert np.abs(pixels(run(path)) - (50000 >> 8, 30000 >> 8, 10000 >> 8)).max() <= 1


def test_animated_gif_gives_its_first_frame(broken: Path) -> None:
    assert np.abs(pixels(run(broken / corpus.BROKEN_ANIMATED)) - corpus.RED).max() < 2


def _with_transparency(mode: str, colour: int, transparent: int) -> Image.Image:
    image = Image.new(mode, (2, 2), colour)
    image.info["transparency"] = transparent
    return image


@pytest.mark.parametrize(
    ("image", "rgb"),
    [
        (Image.new("I;16", (2, 2), 32768), (128, 128, 128)),
        (Image.new("I;16B", (2, 2), 65535), (255, 255, 255)),
        (Image.new("I", (2, 2), 4096), (16, 16, 16)),
        (Image.new("I", (2, 2), 70000), (255, 255, 255)),
        (Image.new("F", (2, 2), 0.5), (128, 128, 128)),
        (Image.new("F", (2, 2), 200.0), (200, 200, 200)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("CMYK", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
        (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (2, 2), (40, 255)), (40, 40, 40)),
        (Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
        (Image.new("RGBa", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("PA", (2, 2), (0, 0)), (255, 255, 255)),
        (_with_transparency("P", 0, transparent=0), (255, 255, 255)),
        (_with_transparency("L", 7, transparent=9), (7, 7, 7)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else None,
)
def test_to_rgb(image: Image.Image, rgb: tuple[int, int, int]) -> None:
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert converted.getpixel((1, 1)) == rgb


def test_mode_pillow_cannot_convert_is_rejected() -> None:
    with pytest.raises(Rejected, match="unsupported colour mode La"):
        to_rgb(Image.new("La", (2, 2)))


REJECTIONS = [
    (rel, outcome.removeprefix("rejected:"))
    for rel, outcome in corpus.BROKEN_CORPUS.items()
    if outcome.startswith("rejected:") and outcome not in corpus.STAGE_LEVEL
]


@pytest.mark.parametrize(("rel", "keyword"), REJECTIONS, ids=[rel for rel, _ in REJECTIONS])
def test_unusable_file_is_rejected_with_its_reason(broken: Path, rel: str, keyword: str) -> None:
    with pytest.raises(Rejected, match=keyword):
        run(broken / rel)


def test_rejection_table_covers_the_corpus() -> None:
    assert {rel for rel, _ in REJECTIONS} == {
        "empty.jpg",
        "notes.png",
        "truncated.jpg",
        "corrupt.png",
        "bomb.png",
        "bomb huge.png",
        "tiny.png",
    }


def test_bomb_reason_names_pixels_and_limit(broken: Path) -> None:
    with pytest.raises(Rejected, match=r"^decompression bomb: 100000000 pixels > limit 40000000$"):
        run(broken / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's global guard left as it was


def test_broken_exif_falls_back_to_the_stored_orientation(broken: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(broken / "broken exif.jpg").original_size == (360, 300)

    def crash(image: Image.Image) -> Image.Image:
        raise SyntaxError("malformed EXIF")

    monkeypatch.setattr(imaging.ImageOps, "exif_transpose", crash)
    assert run(broken / "broken exif.jpg").original_size == (360, 300)


def test_sources_are_never_modified(user: Path, broken: Path) -> None:
    files = [path for root in (user, broken) for path in sorted(root.rglob("*")) if path.is_file()]
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    for path in files:
        for crop in imaging.CROP_MODES:
            with contextlib.suppress(Rejected):
                run(path, crop)
    assert {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files} == before


@pytest.mark.parametrize("resolution", [0, 56, 100, 513, 4104, 1_000_000])
def test_resolution_must_be_a_multiple_of_8_from_64_to_4096(resolution: int) -> None:
    with pytest.raises(ValueError, match="must be a multiple of 8 from 64 to 4096"):
        image_side(resolution)
    assert (image_side(64), image_side(1024), image_side(4096)) == (64, 1024, 4096)


def test_unknown_crop_mode_is_a_config_error(user: Path) -> None:
    with pytest.raises(ValueError, match="crop 'random'"):
        run(user / corpus.USER_UPPERCASE_JPG, crop="random")


@pytest.mark.parametrize(
    ("size", "box"),
    [
        ((640, 480), (80, 0, 560, 480)),
        ((480, 640), (0, 80, 480, 560)),
        ((301, 300), (0, 0, 300, 300)),
        ((300, 300), (0, 0, 300, 300)),
    ],
)
def test_center_square_box(size: tuple[int, int], box: imaging.Box) -> None:
    assert center_square_box(size) == box


@pytest.mark.parametrize(
    ("size", "face", "margin", "box"),
    [
        # room on every side: the largest square centred exactly on the face
        ((1000, 750), (650, 250, 750, 350), 0.5, (400, 0, 1000, 600)),
        # face near the left edge: grown to hold face + margin, then shifted inside the image
        ((1000, 750), (10, 300, 110, 400), 0.5, (0, 250, 200, 450)),
        # face in a corner with a big margin: the square is clamped into the corner
        ((800, 600), (700, 500, 780, 580), 1.0, (560, 360, 800, 600)),
        # face plus margin larger than the image: the image's largest square, as central as possible
        ((400, 300), (100, 50, 300, 250), 1.0, (50, 0, 350, 300)),
    ],
)
def test_face_square_box_examples(size: tuple[int, int], face: imaging.Box, margin: float, box: imaging.Box) -> None:
    assert face_square_box(size, face, margin) == box


def test_face_square_box_properties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = (int(value) for value in rng.integers(64, 2000, 2))
        face_side = int(rng.integers(8, min(width, height) // 2))
        left, top = int(rng.integers(0, width - face_side)), int(rng.integers(0, height - face_side))
        face = (left, top, left + face_side, top + face_side)
        margin = float(rng.uniform(0, 1.5))
        x0, y0, x1, y1 = face_square_box((width, height), face, margin)
        assert x1 - x0 == y1 - y0 > 0
        assert min(x0, y0) >= 0 and x1 <= width and y1 <= height
        pad = margin * face_side
        need = (
            max(0, left - pad),
            max(0, top - pad),
            min(width, left + face_side + pad),
            min(height, top + face_side + pad),
        )
        if max(need[2] - need[0], need[3] - need[1]) <= min(width, height) - 1:
            assert x0 <= need[0] and y0 <= need[1] and x1 >= need[2] and y1 >= need[3]
        centre = (left + face_side / 2, top + face_side / 2)
        if x1 - x0 <= 2 * min(centre[0], width - centre[0], centre[1], height - centre[1]):
            assert abs((x0 + x1) / 2 - centre[0]) <= 1 and abs((y0 + y1) / 2 - centre[1]) <= 1


def test_face_crop_uses_the_largest_detected_face(user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    faces = [(20, 20, 60, 60), (400, 100, 500, 200), (300, 300, 330, 330)]
    monkeypatch.setattr(imaging, "detect_faces", lambda image: faces)
    prepared = run(user / corpus.USER_UPPERCASE_JPG, crop="face", face_margin=0.5)
    assert (prepared.crop_mode, prepared.note) == ("face", "")
    assert prepared.crop_box == face_square_box((640, 480), faces[1], 0.5) == (300, 0, 600, 300)


def test_face_crop_without_a_face_falls_back_to_center(user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "detect_faces", lambda image: [])
    prepared = run(user / corpus.USER_UPPERCASE_JPG, crop="face")
    assert (prepared.crop_mode, prepared.note) == ("center", "no face found; center crop")
    assert prepared.crop_box == center_square_box((640, 480))


def test_haar_cascade_finds_a_drawn_face_and_centres_the_crop_on_it(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    corpus.face_image((900, 600), centre=(300, 320), radius=80).save(path)
    prepared = run(path, crop="face", face_margin=0.3)
    assert (prepared.crop_mode, prepared.note) == ("face", "")
    x0, y0, x1, y1 = prepared.crop_box
    assert abs((x0 + x1) / 2 - 300) < 20 and abs((y0 + y1) / 2 - 320) < 20
    assert x0 <= 300 - 80 and x1 >= 300 + 80 and y0 <= 320 - 100 and y1 >= 320 + 100


def test_haar_cascade_finds_no_face_in_a_landscape(user: Path) -> None:
    prepared = run(user / "misc/café.webp", crop="face")
    assert (prepared.crop_mode, prepared.note) == ("center", "no face found; center crop")
