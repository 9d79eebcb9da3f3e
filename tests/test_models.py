"""Tiny presets build offline and byte-identically, reload exactly, and resolve like any other model id.

Component identities follow file content, not location; unreachable hub ids fail fast with one clear line.
"""

import hashlib
import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from processes import run

from flows.preflight import check_settings
from tasks.core import hash_memo
from tasks.core.config import ConfigError
from tasks.core.config_load import load_config
from tasks.core.hash_memo import HashMemo
from tasks.sd.models import ModelUnavailable, component_identity, model_family, resolve_model
from tasks.sd.presets import PRESETS, SHIPPED_FOLDER, list_models

PIPELINE_CLASSES = {"tiny-sd15": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
SCHEDULERS = {"tiny-sd15": "PNDMScheduler", "tiny-sdxl": "EulerDiscreteScheduler"}
VAE_SCALING = {"tiny-sd15": 0.18215, "tiny-sdxl": 0.13025}

TINY = ["tiny-sd15", "tiny-sdxl"]  # the full-size presets are never built by the suite


def file_digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def components(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, DiffusionPipeline]]:
    """Each preset built once straight into a folder, with the in-memory pipeline that was saved."""
    base = tmp_path_factory.mktemp("fresh")
    return {name: (base / name, PRESETS[name].build(base / name)) for name in TINY}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact root (elsewhere than `fresh`) where resolve_model built each preset once."""
    root = tmp_path_factory.mktemp("elsewhere") / "deeper" / "artifacts"
    for name in TINY:
        resolve_model(name, root)
    return root


@pytest.mark.parametrize("name", TINY)
def test_preset_reloads_exactly_with_diffusers(name: str, fresh: dict) -> None:
    folder, built = fresh[name]
    reloaded = PIPELINE_CLASSES[name].from_pretrained(folder)
    assert model_family(folder) == PRESETS[name].family
    norms = [m for m in (*built.unet.modules(), *built.vae.modules()) if isinstance(m, torch.nn.GroupNorm)]
    assert min(m.num_channels // m.num_groups for m in norms) >= 4
    for module in (m for m in MODULES if getattr(built, m, None) is not None):
        expected, actual = getattr(built, module).state_dict(), getattr(reloaded, module).state_dict()
        assert expected.keys() == actual.keys(), module
        assert all(torch.equal(expected[k], actual[k]) for k in expected), module
    for tokenizer in (t for t in ("tokenizer", "tokenizer_2") if getattr(built, t, None) is not None):
        before, after = getattr(built, tokenizer), getattr(reloaded, tokenizer)
        assert after("a photo of sks dog, Ünïcode!").input_ids == before("a photo of sks dog, Ünïcode!").input_ids
        assert len(after("a photo of sks dog").input_ids) == 7  # bos, one token per merged word, eos
        assert after.model_max_length == 77
    scheduler = reloaded.scheduler
    assert type(scheduler).__name__ == SCHEDULERS[name]
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert (scheduler.config.beta_schedule, scheduler.config.num_train_timesteps) == ("scaled_linear", 1000)
    assert (scheduler.config.steps_offset, scheduler.config.prediction_type) == (1, "epsilon")


@pytest.mark.parametrize("name", TINY)
def test_vae_downsamples_by_8(name: str, fresh: dict) -> None:
    vae = fresh[name][1].vae
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(image).latent_dist
        decoded = vae.decode(latent.mean).sample
    assert latent.mean.shape == (1, 4, 8, 8)
    assert decoded.shape == (1, 3, 64, 64)
    assert vae.config.scaling_factor == VAE_SCALING[name]


@pytest.mark.parametrize("name", TINY)
def test_load_pipeline_generates(name: str, root: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(resolve_model(name, root))
    assert isinstance(pipe, PIPELINE_CLASSES[name])
    images = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert 0.0 <= images.min() <= images.max() <= 1.0


@pytest.mark.parametrize("name", TINY)
def test_builds_are_byte_identical_in_any_folder(name: str, fresh: dict, root: Path) -> None:
    here, there = fresh[name][0], root / "models" / name
    assert file_digests(here) == file_digests(there)
    for component in components(here):
        assert component_identity(here, component) == component_identity(there, component)
    for config in here.rglob("*.json"):
        text = config.read_text(encoding="utf-8")
        assert str(here.parent) not in text and "_name_or_path" not in text, config


@pytest.mark.parametrize("name", TINY)
def test_component_identity_follows_content(name: str, root: Path, tmp_path: Path, monkeypatch) -> None:
    folder = shutil.copytree(root / "models" / name, tmp_path / name)
    # The hash memo's clock 10 s ahead, so it remembers every file: a digest it remembers must not hide a change.
    monkeypatch.setattr(hash_memo, "time", SimpleNamespace(time_ns=lambda: time.time_ns() + 10_000_000_000))

    def identities() -> dict[str, str]:
        with HashMemo(tmp_path) as memo:
            return {c: component_identity(folder, c, memo.sha256) for c in components(folder)}

    before = identities()
    assert before == {c: component_identity(folder, c) for c in components(folder)}
    for component in components(folder):
        largest = max((p for p in (folder / component).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        stat = largest.stat()
        time.sleep(0.02)  # the write lands in a later clock tick than the digest's stat, as it would after 2 s
        with largest.open("r+b") as file:  # same size, same inode, the mtime put back below: only the ctime tells
            file.seek(-1, os.SEEK_END)
            last = file.read(1)
            file.seek(-1, os.SEEK_END)
            file.write(bytes([last[0] ^ 1]))
        os.utime(largest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        now = identities()
        assert {c for c in now if now[c] != before[c]} == {component}
        before = now


def test_identity_sees_a_rewrite_within_one_clock_tick(root: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(root / "models" / "tiny-sd15", tmp_path / "tiny-sd15")
    config = folder / "scheduler" / "scheduler_config.json"
    tick = time.time_ns()
    os.utime(config, ns=(tick, tick))
    with HashMemo(tmp_path) as memo:
        before = component_identity(folder, "scheduler", memo.sha256)
    config.write_bytes(config.read_bytes().replace(b"1000", b"1001"))  # same size, same inode
    os.utime(config, ns=(tick, tick))  # a filesystem clock too coarse to see the rewrite
    with HashMemo(tmp_path) as memo:
        assert component_identity(folder, "scheduler", memo.sha256) != before


def test_build_neither_reads_nor_moves_the_callers_rng(root: Path, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    folder = resolve_model("tiny-sd15", tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    assert file_digests(folder) == file_digests(root / "models" / "tiny-sd15")


def test_second_resolve_reuses_the_folder(root: Path) -> None:
    folder = root / "models" / "tiny-sd15"
    before = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))]
    assert resolve_model("tiny-sd15", root) == folder
    assert [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))] == before
    assert (root / ".locks" / "store" / "models-tiny-sd15.lock").exists()


def test_concurrent_builds_leave_one_complete_folder(root: Path, tmp_path: Path) -> None:
    stale = tmp_path / "models" / "tiny-sd15.partial-12345"  # what a killed build leaves behind
    stale.mkdir(parents=True)
    (stale / "model_index.json").write_text("{}")
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: resolve_model("tiny-sd15", tmp_path), range(2)))
    assert folders == [tmp_path / "models" / "tiny-sd15"] * 2
    assert file_digests(folders[0]) == file_digests(root / "models" / "tiny-sd15")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-sd15"]


def test_list_models_reports_built_and_missing(root: Path, tmp_path: Path) -> None:
    shipped = SHIPPED_FOLDER / "toy-sd"
    assert [(row["name"], row["built"], row["path"]) for row in list_models(tmp_path)] == [
        ("tiny-sd15", False, str(tmp_path / "models" / "tiny-sd15")),
        ("tiny-sdxl", False, str(tmp_path / "models" / "tiny-sdxl")),
        ("sd15-arch", False, str(tmp_path / "models" / "sd15-arch")),  # listed, built only when a run asks
        ("sdxl-arch", False, str(tmp_path / "models" / "sdxl-arch")),
        ("toy-sd", True, str(shipped)),  # ships with the project: never built
    ]
    rows = {row["name"]: row for row in list_models(root) if row["built"]}
    assert {name: row["family"] for name, row in rows.items()} == {
        "tiny-sd15": "sd15",
        "tiny-sdxl": "sdxl",
        "toy-sd": "sd15",
    }
    for name, row in rows.items():
        folder = shipped if name == "toy-sd" else root / "models" / name
        assert row["built"] and row["path"] == str(folder)
        assert row["size_bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) > 0


def _not_a_diffusers_folder(tmp_path: Path) -> str:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        (_not_a_diffusers_folder, "has no model_index.json"),
        (lambda _: "not a valid id!!", "is not a preset, an existing folder or a valid hub id"),
        (lambda tmp_path: f"{tmp_path}/missing/folder", "is not a preset, an existing folder or a valid hub id"),
    ],
    ids=["folder-without-model-index", "invalid-hub-id", "missing-folder"],
)
def test_bad_model_ids(model_id: Callable[[Path], str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match=message):
        resolve_model(model_id(tmp_path), tmp_path)


HUB_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    from pathlib import Path
    from tasks.sd.models import ModelUnavailable, component_identity, model_family, resolve_model

    reached = []  # every address a lookup tries: where a slow failure (timeouts, retries) would begin

    def refuse(address, *args, **kwargs):
        reached.append(str(address))
        raise OSError("this test allows no network")

    socket.getaddrinfo, socket.socket.connect = refuse, lambda self, address: refuse(address)
    root = Path(sys.argv[1])
    cached = resolve_model("someone/tiny-sd15", root)
    result = {"cached": str(cached), "family": model_family(cached), "unet": component_identity(cached, "unet")}
    pinned = {revision: resolve_model("someone/tiny-sd15", root, revision) for revision in sys.argv[2:]}
    result["pinned"] = {revision: component_identity(path, "unet") for revision, path in pinned.items()}
    for name, revision in (("error", ""), ("revision_error", "v9")):
        try:
            resolve_model("someone/not-a-model" if not revision else "someone/tiny-sd15", root, revision)
        except ModelUnavailable as error:
            result[name] = str(error)
    result["reached"] = reached
    print(json.dumps(result))
    """
)


def test_hub_ids_resolve_from_the_cache_or_fail_in_one_line(root: Path, tmp_path: Path) -> None:
    commit, tagged = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd15"
    for snapshot in (commit, tagged):
        shutil.copytree(root / "models" / "tiny-sd15", repo / "snapshots" / snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1").write_text(tagged)  # a tag that names another commit than main
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-c", HUB_SCRIPT, root, "v1", commit]
    process = run(command, env=env, capture_output=True, text=True, timeout=60)
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout.splitlines()[-1])
    assert result["cached"] == str(repo / "snapshots" / commit)
    assert result["family"] == "sd15"
    assert result["unet"] == f"hub:someone/tiny-sd15@{commit}"
    # model.revision pins a snapshot, and the keys' identity is the commit it names
    assert result["pinned"] == {"v1": f"hub:someone/tiny-sd15@{tagged}", commit: f"hub:someone/tiny-sd15@{commit}"}
    assert "'someone/tiny-sd15' at revision 'v9' is not in the local Hugging Face cache" in result["revision_error"]
    assert "\n" not in result["revision_error"]
    assert "\n" not in result["error"] and "'someone/not-a-model'" in result["error"]
    assert "local Hugging Face cache" in result["error"] and "tiny-sd15" in result["error"]
    assert result["reached"] == []  # it fails at once: offline, it never waits on the network


def test_a_revision_pins_only_a_hub_model_and_is_checked_before_the_run(tmp_path: Path) -> None:
    images = shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "demo", tmp_path / "images")
    base = [f"data.instance_dir='{images}'"]
    for setting, line in (
        ("model.revision='v1'", "model.revision = 'v1' pins a hub repo, and 'tiny-sd15' is not one"),
        ("model.vae_revision='v1'", "model.vae_revision = 'v1' pins a hub repo, and '' is not one"),
    ):
        with pytest.raises(ConfigError) as caught:
            check_settings(load_config(None, [*base, setting], tmp_path / "a"))
        assert str(caught.value).startswith(line), caught.value
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*base, "model.revision='main; rm -rf'"], tmp_path / "a")
    assert "model.revision" in str(caught.value)
