"""Exports reload to exactly the trained weights through the loaders their users run.

sd15: the pipeline folder and the A1111/LDM single file beside it (from_single_file), what training left unchanged
linked from the base, float16 and bfloat16 as asked; sdxl: LoRA in diffusers and kohya layouts (load_lora_weights +
fuse_lora); the model card loads with huggingface_hub and keeps user text verbatim.
"""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from huggingface_hub import ModelCard
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessor

from tasks.sd.card import write_model_card
from tasks.sd.export import KOHYA_FILE, LORA_FILE, SINGLE_FILE, export_lora, export_sd15, save_sdxl_lora
from tasks.sd.ldm import ldm_unet_state, ldm_vae_state
from tasks.sd.models import ResolvedModel, hub_repo, resolve

SD15_COMPONENTS = ("unet", "vae", "text_encoder")
TRAINED_SD15 = ("unet", "text_encoder")
SDXL_LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK = 4
# Tensor counts of SD 1.5's own checkpoint (v1-5-pruned): UNet 686, VAE 248 (block layout, not channel widths).
SD15_UNET = {"layers_per_block": 2, "block_out_channels": (8, 16, 32, 32), "norm_num_groups": 4}
SD15_VAE = {"layers_per_block": 2, "block_out_channels": (8, 16, 32, 32), "norm_num_groups": 4}
# Names every SD 1.5 checkpoint that A1111 loads has: resamplers, attention slots, mid-block, 1x1-conv VAE attention.
A1111_LANDMARKS = {
    "model.diffusion_model.input_blocks.0.0.weight": None,
    "model.diffusion_model.input_blocks.3.0.op.weight": None,
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": None,
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": None,
    "model.diffusion_model.output_blocks.2.1.conv.weight": None,
    "model.diffusion_model.output_blocks.5.2.conv.weight": None,
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": None,
    "model.diffusion_model.out.2.weight": None,
    "first_stage_model.encoder.down.3.block.1.conv2.weight": None,
    "first_stage_model.decoder.up.3.upsample.conv.weight": None,
    "first_stage_model.decoder.up.0.block.2.conv2.weight": None,
    "first_stage_model.encoder.mid.attn_1.q.weight": (32, 32, 1, 1),
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": (32, 32, 1, 1),
}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(actual: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = actual.state_dict()
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def sd15(root: Path) -> ResolvedModel:
    return resolve("tiny-sd15", "", root)


@pytest.fixture(scope="module")
def sdxl(root: Path) -> ResolvedModel:
    return resolve("tiny-sdxl", "", root)


@pytest.fixture(scope="module")
def trained_sd15(sd15: ResolvedModel, root: Path) -> tuple[dict[str, dict], dict[str, dict], Path, dict[str, Any]]:
    """Base and 'trained' states (seeded noise on every unet and text-encoder tensor) and what saving them wrote."""
    pipe = StableDiffusionPipeline.from_pretrained(sd15.path)
    base = {name: state(getattr(pipe, name)) for name in SD15_COMPONENTS}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in TRAINED_SD15:
            for tensor in getattr(pipe, name).state_dict().values():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    trained = {name: state(getattr(pipe, name)) for name in SD15_COMPONENTS}
    weights = save_trained(pipe, root / "sd15-weights")
    out = root / "sd15-out"
    facts = export_sd15(sd15.path, weights, out)
    return base, trained, out, facts


def save_trained(pipe: StableDiffusionPipeline, weights: Path) -> Path:
    """The trained UNet and text encoder as training keeps them."""
    for name in TRAINED_SD15:
        getattr(pipe, name).save_pretrained(weights / name, safe_serialization=True)
    return weights


def inode(path: Path) -> int:
    return path.stat().st_ino


def test_sd15_links_what_training_left_and_what_it_trained(sd15: ResolvedModel, trained_sd15: tuple, root: Path):
    """float32: every weight file is a link (the VAE to the base's, UNet and text encoder to the trained weights),
    so the export costs the single file and a few configs."""
    out, facts = trained_sd15[2], trained_sd15[3]
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    assert inode(out / vae_file) == inode(sd15.path / vae_file)
    assert inode(out / "unet/diffusion_pytorch_model.safetensors") == inode(
        root / "sd15-weights/unet/diffusion_pytorch_model.safetensors"
    )
    assert facts["linked"] == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] and facts["dtype"] == "float32"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sd15_in_half_precision_holds_the_trained_weights_cast(
    sd15: ResolvedModel, trained_sd15: tuple, root: Path, dtype: str
) -> None:
    """Nothing is linked that would not load in the asked dtype; no single file when it is not asked for."""
    _, trained, _, _ = trained_sd15
    out = root / f"sd15-{dtype}"
    facts = export_sd15(sd15.path, root / "sd15-weights", out, dtype, single_file=False)
    torch_dtype = getattr(torch, dtype)
    reloaded = StableDiffusionPipeline.from_pretrained(out, dtype=torch_dtype)
    for name in SD15_COMPONENTS:
        module = getattr(reloaded, name)
        assert {p.dtype for p in module.parameters()} == {torch_dtype}
        assert_same(module, {k: v.to(torch_dtype) for k, v in trained[name].items()})
    assert facts["linked"] == ["scheduler", "tokenizer"] and not (out / SINGLE_FILE).exists()
    assert SINGLE_FILE not in facts["files"]


def test_sd15_configs_name_the_base_never_its_local_folder(sd15: ResolvedModel, trained_sd15: tuple) -> None:
    out = trained_sd15[2]
    configs = {f.relative_to(out): f.read_text() for f in out.rglob("*.json")}
    assert [name for name, text in configs.items() if str(sd15.path.parent) in text] == []
    assert json.loads(configs[Path("model_index.json")])["_name_or_path"] == sd15.path.name


def test_sd15_diffusers_folder_holds_the_trained_weights(trained_sd15: tuple) -> None:
    base, trained, out, facts = trained_sd15
    reloaded = StableDiffusionPipeline.from_pretrained(out)
    for name in SD15_COMPONENTS:
        assert_same(getattr(reloaded, name), trained[name])
    for name in TRAINED_SD15:  # every trained tensor moved away from the base; the VAE did not
        assert [k for k, v in base[name].items() if torch.equal(v, trained[name][k])] == []
    assert_same(reloaded.vae, base["vae"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    assert facts["safety_checker"] == "none in base model"


def test_sd15_single_file_is_ldm_layout_and_reloads_exactly(trained_sd15: tuple) -> None:
    _, trained, out, facts = trained_sd15
    tensors = load_file(out / "model.safetensors")
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    counts = {prefix: sum(k.startswith(prefix) for k in tensors) for prefix in prefixes}
    assert counts == dict(zip(prefixes, (208, 184, 36), strict=True))
    assert len(tensors) == facts["files"]["model.safetensors"]["tensors"] == 428
    assert facts["ldm_tensors"] == {"unet": 208, "vae": 184, "text_encoder": 36}
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors
    assert "first_stage_model.encoder.conv_in.weight" in tensors
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in tensors
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in tensors
    # Tiny UNet (2 blocks, 1 layer each): the downsampler is input block 2, the upsampler output block 1's 2nd slot.
    assert tensors["model.diffusion_model.input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert tensors["model.diffusion_model.output_blocks.1.1.conv.weight"].shape == (64, 64, 3, 3)
    assert tensors["first_stage_model.decoder.mid.attn_1.k.weight"].shape == (32, 32, 1, 1)

    reloaded = StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(out), local_files_only=True
    )
    for name in SD15_COMPONENTS:
        assert_same(getattr(reloaded, name), trained[name])


def test_ldm_layout_follows_the_block_layout_of_sd15() -> None:
    """SD 1.5's layout (4 blocks, 2 layers each) at tiny widths: its tensor counts, A1111's names, and diffusers'
    own LDM -> diffusers conversion gives back every tensor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=8, attention_head_dim=2, **SD15_UNET)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **SD15_VAE
        )
    ldm_unet, ldm_vae = ldm_unet_state(unet), ldm_vae_state(vae)
    assert (len(ldm_unet), len(ldm_vae)) == (686, 248)
    ldm = ldm_unet | ldm_vae
    assert {k: tuple(ldm[k].shape) if shape else None for k, shape in A1111_LANDMARKS.items() if k in ldm} == (
        A1111_LANDMARKS
    )
    for model, converted in (
        (unet, convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(ldm, dict(vae.config))),
    ):
        assert_same(model, converted)


def test_ldm_export_fails_on_a_module_it_cannot_name(sdxl: ResolvedModel) -> None:
    unet = UNet2DConditionModel.from_pretrained(sdxl.path / "unet")  # SDXL's add_embedding has no sd15 LDM name
    with pytest.raises(ValueError, match="add_embedding"):
        ldm_unet_state(unet)


@pytest.fixture(scope="module")
def with_safety_checker(sd15: ResolvedModel, root: Path) -> Path:
    """The tiny preset plus a tiny safety checker, like stable-diffusion-v1-5's folder."""
    tiny_clip = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(text_config=tiny_clip, vision_config=tiny_clip | {"image_size": 32, "patch_size": 8})
    pipe = StableDiffusionPipeline.from_pretrained(
        sd15.path,
        safety_checker=StableDiffusionSafetyChecker(config),
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
        requires_safety_checker=True,
    )
    pipe.save_pretrained(root / "sd15-checked", safe_serialization=True)
    return root / "sd15-checked"


@pytest.mark.parametrize(
    ("keep", "entry", "required", "fact", "dtype"),
    [(False, None, False, "removed", "float32"), (True, "stable_diffusion", True, "kept", "float16")],
)
def test_safety_checker_is_an_explicit_choice(
    with_safety_checker: Path, root: Path, keep: bool, entry: str | None, required: bool, fact: str, dtype: str
) -> None:
    """Kept, it is exported as the other components are: here cast to float16, and loaded by the pipeline."""
    pipe = StableDiffusionPipeline.from_pretrained(with_safety_checker)
    out = root / f"checked-{keep}"
    weights = save_trained(pipe, root / f"checked-weights-{keep}")
    facts = export_sd15(with_safety_checker, weights, out, dtype, safety_checker=keep)
    reloaded = StableDiffusionPipeline.from_pretrained(out, dtype=getattr(torch, dtype))
    assert (reloaded.safety_checker is not None) == keep
    if keep:
        assert {p.dtype for p in reloaded.safety_checker.parameters()} == {torch.float16}
    index = json.loads((out / "model_index.json").read_text())
    assert (index["safety_checker"][0], index["requires_safety_checker"], facts["safety_checker"]) == (
        entry,
        required,
        fact,
    )
    assert (out / "safety_checker").is_dir() == keep


def lora_layers(module: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)}


@pytest.fixture(scope="module")
def trained_sdxl(sdxl: ResolvedModel, root: Path) -> tuple[dict[str, dict], Path, dict[str, Any]]:
    """LoRA on the unet and both text encoders with seeded random B (A is peft's gaussian init), saved; for every
    wrapped Linear its base weight and the expected fused weight base + scale * B @ A."""
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl.path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = {"r": RANK, "lora_alpha": RANK, "init_lora_weights": "gaussian"}
        pipe.unet.add_adapter(LoraConfig(**config, target_modules=UNET_TARGETS))
        for name in ("text_encoder", "text_encoder_2"):  # transformers' add_adapter wants peft >= 0.22
            inject_adapter_in_model(LoraConfig(**config, target_modules=TEXT_TARGETS), getattr(pipe, name))
    generator = torch.Generator().manual_seed(1)
    expected = {}
    with torch.no_grad():
        for name in SDXL_LORA_COMPONENTS:
            layers = lora_layers(getattr(pipe, name))
            for layer in layers.values():
                layer.lora_B["default"].weight.copy_(
                    torch.randn(layer.lora_B["default"].weight.shape, generator=generator)
                )
            expected[name] = {
                path: (
                    layer.base_layer.weight.clone(),
                    layer.base_layer.weight
                    + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight,
                )
                for path, layer in layers.items()
            }
    weights = root / "sdxl-weights"
    states = (get_peft_model_state_dict(getattr(pipe, name)) for name in SDXL_LORA_COMPONENTS)
    trained = save_sdxl_lora(*states, weights)
    out = root / "sdxl-out"
    return expected, out, {**export_lora(weights, out), "lora_modules": trained["lora_modules"]}


def test_sdxl_lora_in_half_precision_is_cast_and_kohya_only_when_asked(trained_sdxl: tuple, root: Path) -> None:
    _, out, _ = trained_sdxl
    assert inode(out / LORA_FILE) == inode(root / "sdxl-weights" / LORA_FILE)  # float32, as trained: a link
    half = root / "sdxl-half"
    facts = export_lora(root / "sdxl-weights", half, "float16", kohya=False)
    assert sorted(facts["files"]) == [LORA_FILE] and not (half / KOHYA_FILE).exists()
    full, cast = load_file(out / LORA_FILE), load_file(half / LORA_FILE)
    assert sorted(cast) == sorted(full) and {t.dtype for t in cast.values()} == {torch.float16}
    assert all(torch.equal(cast[k], full[k].half()) for k in full)


@pytest.mark.parametrize("weight_name", [None, KOHYA_FILE], ids=["default", "kohya"])
def test_sdxl_lora_loads_and_fuses_to_the_trained_weights(
    trained_sdxl: tuple, sdxl: ResolvedModel, weight_name: str | None
) -> None:
    expected, out, facts = trained_sdxl
    assert {name: len(layers) for name, layers in expected.items()} == facts["lora_modules"]
    assert facts["lora_modules"] == {"unet": 64, "text_encoder": 8, "text_encoder_2": 8}
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl.path)
    pipe.load_lora_weights(out, weight_name=weight_name)
    assert {name: len(lora_layers(getattr(pipe, name))) for name in SDXL_LORA_COMPONENTS} == facts["lora_modules"]
    pipe.fuse_lora(components=list(SDXL_LORA_COMPONENTS))
    for name in SDXL_LORA_COMPONENTS:
        loaded = lora_layers(getattr(pipe, name))
        for path, (base, fused) in expected[name].items():
            weight = loaded[path].base_layer.weight
            assert (weight - base).abs().max() > 1e-2  # the LoRA changed it ...
            torch.testing.assert_close(weight, fused, rtol=0, atol=1e-6)  # ... to exactly the trained update


def test_sdxl_lora_files_use_the_diffusers_and_kohya_names(trained_sdxl: tuple) -> None:
    _, out, facts = trained_sdxl
    diffusers_keys = load_file(out / LORA_FILE)
    kohya = load_file(out / KOHYA_FILE)
    modules = sum(facts["lora_modules"].values())
    assert (len(diffusers_keys), len(kohya)) == (2 * modules, 3 * modules)  # down, up (+ alpha in kohya)
    assert facts["files"][KOHYA_FILE]["tensors"] == 3 * modules
    assert {k.split(".")[0] for k in diffusers_keys} == set(SDXL_LORA_COMPONENTS)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in kohya
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in kohya
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {float(RANK)}


TRICKY_PROMPT = 'A photo of rory\'s "face" | <b>x</b> & `tick` ```\n---\n# not a heading: {a: 1}'
HOSTILE_PROMPTS = [
    TRICKY_PROMPT,
    "<script>alert('sks')</script> | a `sks` dog",
    "photo de sks chien, été 🐕 — «zwx»",
    "line one\r\n---\r\nline two",
    "- sks: [dog]  ",
    "````",
]


def table_rows(body: str, header: str) -> list[list[str]]:
    """The cells of each row of the table under `header`, split where Markdown splits them (at unescaped `|`)."""
    lines = body.split("\n")
    start = lines.index(header) + 2
    rows = lines[start : lines.index("", start)]
    return [re.split(r"(?<!\\)\|", row)[1:-1] for row in rows]


def code_span(cell: str) -> str:
    """What a reader sees in a table cell holding one code span (CommonMark: one space stripped from each side when
    both have one; GFM: `\\|` is a `|`)."""
    cell = cell.strip(" ")
    fence = re.match(r"`+", cell).group()
    assert cell.endswith(fence) and len(cell) > 2 * len(fence)
    text = cell[len(fence) : -len(fence)]
    if text.startswith(" ") and text.endswith(" ") and text.strip(" "):
        text = text[1:-1]
    return text.replace("\\|", "|")


@pytest.mark.parametrize(
    ("family", "lora", "tags"),
    [
        ("sd15", False, ["boothflow", "dreambooth", "stable-diffusion", "text-to-image"]),
        ("sdxl", True, ["boothflow", "dreambooth", "stable-diffusion-xl", "lora", "text-to-image"]),
    ],
)
def test_model_card_loads_with_huggingface_hub_and_keeps_user_text(
    tmp_path: Path, family: str, lora: bool, tags: list[str]
) -> None:
    prompts = {f"prompt {i}": prompt for i, prompt in enumerate(HOSTILE_PROMPTS)}
    settings = {"learning_rate": 5e-6, "class_prompt": "a | dog", "train_text_encoder": True, **prompts}
    facts = {
        "family": family,
        "lora": lora,
        "base_model": "tiny-" + family,
        "base_model_repo": "org/base-" + family,
        "instance_prompt": TRICKY_PROMPT,
        "widget_prompts": HOSTILE_PROMPTS,
        "steps": 437,
        "final_loss": 0.0123456789,
        "settings": settings,
        "files": {"model.safetensors": {"bytes": 123, "tensors": 428}},
    }
    write_model_card(tmp_path, facts)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict() == {
        "base_model": "org/base-" + family,
        "library_name": "diffusers",
        "license": "other",
        "pipeline_tag": "text-to-image",
        "tags": tags,
        "instance_prompt": TRICKY_PROMPT,
        "widget": [{"text": prompt} for prompt in HOSTILE_PROMPTS],
    }
    body = card.text
    assert f"of `tiny-{family}`" in body.splitlines()[1]  # the heading names the model as the run named it
    assert f"````text\n{TRICKY_PROMPT}\n````" in body  # verbatim in a fence longer than its own backticks
    rows = table_rows(body, "| setting | value |")
    assert all(len(cells) == 2 for cells in rows) and len(rows) == 4 + len(settings)  # no prompt broke a row
    values = {name.strip(" `"): value.strip() for name, value in rows}
    assert values["steps"] == "`437`"
    assert values["final loss"] == "`0.0123457`"
    assert values["learning_rate"] == "`5e-06`"
    assert values["class_prompt"] == r"`a \| dog`"
    for name, prompt in prompts.items():  # as written; as JSON where a line break would end the row
        shown = code_span(values[name])
        assert (json.loads(shown) if re.search(r"[\r\n]", prompt) else shown) == prompt, name
    assert "&lt;" not in body and "&amp;" not in body
    assert "428 tensors" in body
    assert ("load_lora_weights(THIS_FOLDER)" in body) == lora


def test_model_card_names_missing_facts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['steps', 'final_loss'\]"):
        write_model_card(tmp_path, {"family": "sd15", "base_model": "m", "instance_prompt": "p", "settings": {}})


def test_only_a_hub_repository_is_named_as_the_base_model(tmp_path: Path) -> None:
    assert hub_repo("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (tmp_path / "org").mkdir()
    for not_a_repo in ("tiny-sd15", "toy-sd", str(tmp_path / "org"), "a/b/c", "bad name/x"):
        assert hub_repo(not_a_repo) is None, not_a_repo
