"""The latents stage as a plain function: stored distributions equal the VAE's, keys follow content and settings.

Upstream is a real preprocess entry made from generated PNGs, and a class-images entry laid out by hand.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tasks.core.config import LatentsSection, PreprocessSection
from tasks.core.stage import StageError, StageResult
from tasks.core.store import Store
from tasks.sd import latent_dist
from tasks.sd.models import ResolvedModel, resolve
from tasks.stages import latents, preprocess

SIZES = [(640, 320), (320, 400), (96, 96)]
"""Source sizes (W, H); 640x320 center-cropped to 64 px is box (160, 0, 480, 320): 5 source px per output px."""
SCALING = {"tiny-sd15": 0.18215, "tiny-sdxl": 0.13025}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ResolvedModel]:
    root = tmp_path_factory.mktemp("models")
    return {name: resolve(name, "", root) for name in SCALING}


@pytest.fixture(scope="module")
def vaes(models: dict[str, ResolvedModel]) -> dict[str, AutoencoderKL]:
    """Reference VAEs, loaded independently of the stage."""
    return {
        name: AutoencoderKL.from_pretrained(m.vae_path, torch_dtype=torch.float32).eval() for name, m in models.items()
    }


def _noise_png(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "instance"
    folder.mkdir()
    for i, size in enumerate(SIZES):
        _noise_png(folder / f"{i}.png", size, seed=i)
    return folder


def _preprocess(folder: Path, store: Store, resolution: int = 64) -> StageResult:
    cfg = PreprocessSection(resolution=resolution, min_side=64)
    return preprocess.run(cfg, preprocess.PreprocessInputs(folder, preprocess.scan(folder), 1), store)


def _latents(
    model: ResolvedModel,
    instance: StageResult,
    store: Store,
    classes: StageResult | None = None,
    **settings,
) -> StageResult:
    return latents.run(LatentsSection(**settings), latents.LatentsInputs(model, instance, classes), store)


def _pixels(png: Path) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1], computed here rather than by the stage."""
    array = np.array(Image.open(png).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1


def _stored(result: StageResult) -> dict[str, dict[str, torch.Tensor]]:
    index = pd.read_csv(result.path / "index.csv", dtype=str)
    return {row.id: load_file(result.path / row.file) for row in index.itertuples()}


def _item_entries(result: StageResult, store: Store) -> set[str]:
    """Names of the latents-items entries whose file the stage entry links to."""
    entries = [p for p in (store.root / latents.ITEMS).iterdir() if (p / latents.LATENT_FILE).is_file()]
    linked = set()
    for file in (result.path / "items").iterdir():
        linked |= {p.name for p in entries if os.path.samefile(p / latents.LATENT_FILE, file)}
    return linked


def _metadata(file: Path) -> dict[str, str]:
    with safe_open(file, "pt") as opened:
        [(name, sizes)] = opened.metadata().items()  # one entry: several would be written in a random order
    assert name == "sizes"
    return json.loads(sizes)


def _disallow_vae_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE was loaded although every item was cached")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", refuse)


def test_stored_distribution_is_the_vaes_and_samples_match_diffusers(
    models: dict[str, ResolvedModel], vaes: dict[str, AutoencoderKL], folder: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    result = _latents(models["tiny-sd15"], instance, store, flip=True)
    assert (result.items_processed, result.items_cached, result.status) == (3, 0, "ran")
    table = pd.read_csv(instance.path / "items.csv", dtype=str)
    stored = _stored(result)
    assert sorted(stored) == sorted(sha[:16] for sha in table["source_sha256"])
    vae = vaes["tiny-sd15"]
    for row in table.itertuples():
        item = stored[row.source_sha256[:16]]
        x = _pixels(instance.path / row.image)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            mirrored = vae.encode(x.flip(-1)).latent_dist
        assert item["mean"].shape == item["logvar"].shape == (4, 8, 8)
        assert {t.dtype for t in item.values()} == {torch.float32}
        assert torch.equal(item["mean"], dist.mean[0]) and torch.equal(item["logvar"], dist.logvar[0])
        assert torch.equal(item["mean_flipped"], mirrored.mean[0])
        assert torch.equal(item["logvar_flipped"], mirrored.logvar[0])
        assert (item["mean_flipped"] - item["mean"]).abs().max() > 1e-3  # a mirrored noise image is another image

        for seed in (0, 7):
            expected = dist.sample(torch.Generator().manual_seed(seed))
            from_dist = latent_dist.sample_latent(dist.mean, dist.logvar, torch.Generator().manual_seed(seed))
            assert torch.equal(from_dist, expected)
            from_cache = latent_dist.sample_latent(
                item["mean"][None], item["logvar"][None], torch.Generator().manual_seed(seed)
            )
            assert torch.equal(from_cache, expected)  # batch size 1 on this CPU: the very same floats

    z = torch.full((1, 4, 8, 8), 2.0)
    assert torch.equal(latent_dist.scale_latent(z, 0.5, None), torch.full_like(z, 1.0))
    assert torch.equal(latent_dist.scale_latent(z, 0.5, 1.0), torch.full_like(z, 0.5))


def test_an_items_latents_do_not_depend_on_the_images_encoded_beside_it(
    models: dict[str, ResolvedModel], folder: Path, tmp_path: Path
) -> None:
    """Two machines, or two nights, reach the same items by different roads: here all five images missing at once,
    there one new image a night. Every item is the same to the bit both ways, so a cache hit is exactly what encoding
    it now would give (a batched encode rounds by the batch's shape: one image in a batch of five differed from itself
    alone by a float32 ulp)."""
    _noise_png(folder / "3.png", (128, 128), seed=3)
    _noise_png(folder / "4.png", (80, 100), seed=4)
    at_once, nightly = Store(tmp_path / "at-once"), Store(tmp_path / "nightly")
    together = _latents(models["tiny-sdxl"], _preprocess(folder, at_once), at_once, flip=True)
    assert together.items_processed == 5
    arriving = tmp_path / "arriving"
    arriving.mkdir()
    for image in sorted(folder.iterdir()):
        shutil.copy(image, arriving / image.name)
        one_by_one = _latents(models["tiny-sdxl"], _preprocess(arriving, nightly), nightly, flip=True)
        assert (one_by_one.items_processed, one_by_one.status) == (1, "ran")
    assert one_by_one.key == together.key
    first, second = _stored(together), _stored(one_by_one)
    assert sorted(first) == sorted(second) and len(first) == 5
    for sample_id, tensors in first.items():
        assert sorted(tensors) == ["logvar", "logvar_flipped", "mean", "mean_flipped"]
        for name, tensor in tensors.items():
            assert torch.equal(second[sample_id][name], tensor), (sample_id, name)


def test_rerun_new_image_and_settings(
    models: dict[str, ResolvedModel], folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["tiny-sd15"]
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    first = _latents(model, instance, store)
    assert (first.items_processed, first.items_cached, first.status) == (3, 0, "ran")

    with monkeypatch.context() as patch:
        _disallow_vae_load(patch)
        again = _latents(model, instance, store)
        assert (again.items_processed, again.items_cached, again.status, again.key) == (0, 3, "cached", first.key)
        shutil.rmtree(first.path)  # the stage entry is gone, its items are not: rebuilt without the VAE
        rebuilt = _latents(model, instance, store)
        assert (rebuilt.items_processed, rebuilt.items_cached, rebuilt.status) == (0, 3, "ran")
    assert _item_entries(rebuilt, store) == _item_entries(first, store)

    _noise_png(folder / "new.png", (100, 90), seed=9)
    grown_instance = _preprocess(folder, store)
    grown = _latents(model, grown_instance, store)
    assert (grown.items_processed, grown.items_cached) == (1, 3)
    assert grown.key != first.key
    assert len(_item_entries(grown, store) - _item_entries(first, store)) == 1

    for settings in ({"dtype": "bfloat16"}, {"flip": True}):
        changed = _latents(model, grown_instance, store, **settings)
        assert (changed.items_processed, changed.items_cached) == (4, 0), settings
        assert not _item_entries(changed, store) & _item_entries(grown, store)
    half = _stored(changed)
    assert all(t.dtype == torch.float32 for item in half.values() for t in item.values())

    resized = _latents(model, _preprocess(folder, store, resolution=128), store)
    assert (resized.items_processed, resized.items_cached) == (4, 0)
    assert not _item_entries(resized, store) & _item_entries(grown, store)
    assert {t.shape for item in _stored(resized).values() for t in item.values()} == {(4, 16, 16)}


def test_bfloat16_encoding_is_close_to_float32_and_stored_as_float32(
    models: dict[str, ResolvedModel], folder: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    full = _stored(_latents(models["tiny-sd15"], instance, store))
    half = _stored(_latents(models["tiny-sd15"], instance, store, dtype="bfloat16"))
    for sample_id, tensors in half.items():
        assert tensors["mean"].dtype == torch.float32
        error = (tensors["mean"] - full[sample_id]["mean"]).abs().max().item()
        assert 0 < error < 0.05


def test_presets_with_different_vaes_never_share_entries(
    models: dict[str, ResolvedModel], folder: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    sd15 = _latents(models["tiny-sd15"], instance, store)
    sdxl = _latents(models["tiny-sdxl"], instance, store)
    assert models["tiny-sd15"].identities["vae"] != models["tiny-sdxl"].identities["vae"]
    assert (sdxl.items_processed, sdxl.items_cached) == (3, 0)
    assert sd15.key != sdxl.key
    assert len(_item_entries(sd15, store)) == len(_item_entries(sdxl, store)) == 3
    assert not _item_entries(sd15, store) & _item_entries(sdxl, store)
    # The tiny VAEs have the same weights and differ only in scaling_factor: a cache keyed by file name would
    # hand SD 1.5 latents to SDXL; here they are separate entries, each with its own factor.
    factors = {json.loads((r.path / "vae.json").read_text())["scaling_factor"] for r in (sd15, sdxl)}
    assert factors == set(SCALING.values())


@pytest.mark.parametrize("name", list(SCALING))
def test_vae_json_and_sdxl_size_metadata(
    name: str, models: dict[str, ResolvedModel], folder: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    result = _latents(models[name], instance, store, flip=True)
    vae = json.loads((result.path / "vae.json").read_text())
    assert vae == {"scaling_factor": SCALING[name], "shift_factor": None, "latent_channels": 4, "flip": True}

    table = pd.read_csv(instance.path / "items.csv", dtype=str).set_index("source")
    for source, (width, height) in zip(["0.png", "1.png", "2.png"], SIZES, strict=True):
        row = table.loc[source]
        meta = _metadata(result.path / "items" / f"{row.source_sha256[:16]}.safetensors")
        assert meta["original_size"] == f"{width},{height}" == ",".join(map(str, json.loads(row.original_size)))
        left, top, right, _ = json.loads(row.crop_box)
        scale = 64 / (right - left)
        assert meta["crop_top_left"] == f"{round(top * scale)},{round(left * scale)}"
        assert meta["crop_top_left_flipped"] == f"{round(top * scale)},{round((width - right) * scale)}"
        assert meta["target_size"] == "64,64"
    wide = _metadata(result.path / "items" / f"{table.loc['0.png'].source_sha256[:16]}.safetensors")
    tall = _metadata(result.path / "items" / f"{table.loc['1.png'].source_sha256[:16]}.safetensors")
    # 640x320 cut at (160, 0, 480, 320) -> 5 px per output px: 32 px cut on the left, 32 on the right when mirrored.
    assert (wide["crop_top_left"], wide["crop_top_left_flipped"]) == ("0,32", "0,32")
    # 320x400 cut at (0, 40, 320, 360) -> 64/320 scale: 8 px cut from the top.
    assert (tall["original_size"], tall["crop_top_left"]) == ("320,400", "8,0")


def _class_images(store: Store, count: int, resolution: int = 64) -> StageResult:
    """A class-images entry in the documented layout, committed to the store: images/<id>.png and items.csv."""

    def write(folder: Path) -> dict[str, int]:
        (folder / "images").mkdir(parents=True)
        rows = []
        for index in range(count):
            sample_id = f"{0xC1A55 * (index + 1):016x}"
            _noise_png(folder / "images" / f"{sample_id}.png", (resolution, resolution), seed=100 + index)
            image = f"images/{sample_id}.png"
            row = {"id": sample_id, "index": index, "seed": index, "prompt": "a photo of toy", "status": "ok"}
            rows.append({**row, "image": image})
        pd.DataFrame(rows).to_csv(folder / "items.csv", index=False)
        return {"items": count}

    entry = store.get_or_create("class_images", f"fake{count}x{resolution}", write)
    return StageResult("class_images", entry.key, entry.path)


def test_class_images_are_encoded_and_indexed_after_instances(
    models: dict[str, ResolvedModel], vaes: dict[str, AutoencoderKL], folder: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    alone = _latents(models["tiny-sdxl"], instance, store)
    classes = _class_images(store, 2)
    result = _latents(models["tiny-sdxl"], instance, store, classes)
    assert (result.items_processed, result.items_cached) == (2, 3)
    assert result.key != alone.key

    index = pd.read_csv(result.path / "index.csv", dtype=str)
    instance_ids = sorted(sha[:16] for sha in pd.read_csv(instance.path / "items.csv", dtype=str)["source_sha256"])
    class_table = pd.read_csv(classes.path / "items.csv", dtype=str)
    assert list(index.columns) == ["id", "kind", "file"]
    assert list(index["kind"]) == ["instance"] * 3 + ["class"] * 2
    assert list(index["id"]) == instance_ids + sorted(class_table["id"])
    assert list(index["file"]) == [f"items/{i}.safetensors" for i in index["id"]]

    for row in class_table.itertuples():
        file = result.path / "items" / f"{row.id}.safetensors"
        with torch.no_grad():
            expected = vaes["tiny-sdxl"].encode(_pixels(classes.path / row.image)).latent_dist.mean[0]
        torch.testing.assert_close(load_file(file)["mean"], expected, atol=1e-5, rtol=0)
        meta = _metadata(file)
        assert (meta["original_size"], meta["crop_top_left"], meta["target_size"]) == ("64,64", "0,0", "64,64")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated class image", "cannot read the upstream image"),
        ("class image of another size", "several sizes"),
        ("no items.csv", "has no items.csv"),
    ],
)
def test_bad_upstream_fails_naming_the_item(
    damage: str, message: str, models: dict[str, ResolvedModel], folder: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    classes = _class_images(store, 2, resolution=128 if damage == "class image of another size" else 64)
    broken = classes.path / pd.read_csv(classes.path / "items.csv", dtype=str)["image"][0]
    if damage == "truncated class image":
        broken.write_bytes(broken.read_bytes()[:200])
    if damage == "no items.csv":
        (classes.path / "items.csv").unlink()
    with pytest.raises(StageError) as err:
        _latents(models["tiny-sd15"], instance, store, classes)
    assert message in err.value.message
    if damage == "truncated class image":
        assert err.value.item == str(broken)
    assert not (store.root / latents.STAGE).exists()


def test_a_latent_that_comes_out_nan_fails_naming_the_images(
    models: dict[str, ResolvedModel], folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the float16 VAE overflow is a constructed case: a NaN in the encoder's last bias."""
    real = latents._load_vae

    def overflowing(vae_path: Path, dtype: str) -> AutoencoderKL:
        vae = real(vae_path, dtype)
        with torch.no_grad():
            vae.encoder.conv_out.bias[0] = float("nan")
        return vae

    monkeypatch.setattr(latents, "_load_vae", overflowing)
    store = Store(tmp_path / "artifacts")
    instance = _preprocess(folder, store)
    with pytest.raises(StageError, match="the VAE gave NaN or inf in float32") as err:
        _latents(models["tiny-sd15"], instance, store)
    ids = pd.read_csv(instance.path / "items.csv")["source_sha256"].str[:16]
    assert set(err.value.item.split(", ")) <= set(ids) and err.value.item
    assert not (store.root / latents.ITEMS).exists()  # nothing non-finite is ever cached
