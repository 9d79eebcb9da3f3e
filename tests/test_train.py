"""Training: cached latents train exactly like the reference loop, outputs reload, killed runs resume bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from flows.preflight import check_before_start
from tasks.core.config import ConfigError, DataSection, ExportSection, LatentsSection, PreprocessSection, TrainSection
from tasks.core.config_load import load_config
from tasks.core.faults import ENV as FAULTS_ENV
from tasks.core.seeds import generator
from tasks.core.stage import StageError
from tasks.core.store import Store
from tasks.core.tables import read_rows
from tasks.sd import text
from tasks.sd.layout import MODEL_DIR, WEIGHTS_DIR
from tasks.sd.models import resolve
from tasks.sd.objective import Objective
from tasks.stages import export, latents, preprocess, train
from tasks.training.checkpoints import complete_checkpoints
from tasks.training.conditioning import Conditioner
from tasks.training.data import LatentData
from tasks.training.step import make_batch, training_step

RESOLUTION = 64
INSTANCE_PROMPT = "a photo of sks toy"


def _images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 255, (96, 80 + 8 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def _encoded(root: Path, model_id: str, images: Path, flip: bool = False):
    store = Store(root)
    model = resolve(model_id, "", root)
    files = preprocess.scan(images)
    pre = preprocess.run(
        PreprocessSection(resolution=RESOLUTION, min_side=64), preprocess.PreprocessInputs(images, files, 1), store
    )
    lat = latents.run(LatentsSection(flip=flip), latents.LatentsInputs(model, pre, None), store)
    return model, pre, lat


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    _images(root / "images")
    return root


def _job(model, lat, cfg: TrainSection, out: Path, embeds=None) -> train.TrainJob:
    return train.TrainJob(
        family=model.family, base=model.path, latents_dir=lat.path, out_dir=out,
        checkpoints_dir=out / "ckpt", train=cfg, optimizer="adamw", instance_prompt=INSTANCE_PROMPT,
        class_prompt=None, prior_weight=0.0, text_embeds=embeds, parent_pid=0, facts={},
    )  # fmt: skip


def _reference_loss(model, pre, lat, job, unet, encoders, *, scale=True, mirror_images=False):
    """The diffusers example loop, from diffusers, transformers and torch calls alone (nothing of the training child):
    decode the PNG and `vae.encode(x).latent_dist.sample(generator)` every step, offset noise, `add_noise`, MSE on
    epsilon, the prompt through CLIP (SDXL: both encoders' penultimate states, the second one's pooled output)."""
    vae = AutoencoderKL.from_pretrained(model.vae_path)
    scheduler = DDPMScheduler.from_pretrained(model.path, subfolder="scheduler")
    index = pd.read_csv(lat.path / "index.csv", dtype=str)
    ids = sorted(index[index.kind == "instance"].id)
    files = dict(zip(index.id, index.file, strict=True))
    cfg = job.train
    order = torch.randperm(len(ids), generator=generator(cfg.seed, "order", "instance", 0))  # the first epoch
    samples, noise, steps, time_ids = [], [], [], []
    for j in range(cfg.batch_size):
        sample_id = ids[int(order[j])]
        rng = generator(cfg.seed, "sample", 0, 0, j, "instance", sample_id)
        image = Image.open(pre.path / "images" / f"{sample_id}.png")
        if mirror_images:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(rng)
        z = z * vae.config.scaling_factor if scale else z
        n = torch.randn(z.shape, generator=rng) + 0.1 * torch.randn((*z.shape[:2], 1, 1), generator=rng)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=rng)
        with safe_open(lat.path / files[sample_id], "pt") as f:  # SDXL's sizes, as preprocessing measured them
            sizes = json.loads(f.metadata()["sizes"])
        (width, height), (top, left), (target_w, target_h) = (
            map(int, sizes[name].split(",")) for name in ("original_size", "crop_top_left", "target_size")
        )
        samples.append(z), noise.append(n), steps.append(t)
        time_ids.append(torch.tensor([[height, width, top, left, target_h, target_w]], dtype=torch.float32))
    z, n, t = torch.cat(samples), torch.cat(noise), torch.cat(steps)
    tokenizers = ["tokenizer"] if model.family == "sd15" else ["tokenizer", "tokenizer_2"]
    hidden, pooled = [], None
    for name, encoder in zip(tokenizers, encoders, strict=True):
        tokenizer = CLIPTokenizer.from_pretrained(model.path, subfolder=name)
        prompt_ids = tokenizer([INSTANCE_PROMPT] * len(samples), padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        out = encoder(prompt_ids, output_hidden_states=True)
        hidden.append(out.last_hidden_state if model.family == "sd15" else out.hidden_states[-2])
        pooled = out[0]
    added = None if model.family == "sd15" else {"text_embeds": pooled, "time_ids": torch.cat(time_ids)}
    noisy = scheduler.add_noise(z, n, t)
    prediction = unet(noisy, t, torch.cat(hidden, dim=-1), added_cond_kwargs=added).sample
    return torch.nn.functional.mse_loss(prediction.float(), n.float())


def _cached_loss(model, lat, job, unet, encoders):
    objective = Objective(DDPMScheduler.from_pretrained(model.path, subfolder="scheduler"), 0.1, 0.0, 0.0)
    batch = make_batch(LatentData(lat.path), objective, job, step=0, micro=0)
    return training_step(unet, Conditioner(job, encoders, torch.device("cpu")), objective, batch)


def _loss_and_grads(loss_fn, unet):
    unet.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_id", ["tiny-sd15", "tiny-sdxl"])
def test_cached_latents_train_exactly_like_the_reference_loop(workspace: Path, model_id: str) -> None:
    model, pre, lat = _encoded(workspace, model_id, workspace / "images")
    job = _job(model, lat, TrainSection(batch_size=2), workspace / "job")
    unet = UNet2DConditionModel.from_pretrained(model.path, subfolder="unet")
    encoders = text.load_text_encoders(model.path, model.family)

    cached_loss, cached_grads = _loss_and_grads(lambda: _cached_loss(model, lat, job, unet, encoders), unet)
    ref_loss, ref_grads = _loss_and_grads(lambda: _reference_loss(model, pre, lat, job, unet, encoders), unet)
    assert torch.allclose(cached_loss, ref_loss, rtol=1e-5, atol=1e-6), (cached_loss, ref_loss)
    assert cached_grads.keys() == ref_grads.keys() and len(cached_grads) > 10
    for name, grad in cached_grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-4, atol=1e-6), name

    # Two broken caches the comparison must catch: the scaling factor dropped, and a mirrored image paired
    # with the unmirrored latent.
    unscaled, _ = _loss_and_grads(lambda: _reference_loss(model, pre, lat, job, unet, encoders, scale=False), unet)
    mirrored, _ = _loss_and_grads(
        lambda: _reference_loss(model, pre, lat, job, unet, encoders, mirror_images=True), unet
    )
    for broken in (unscaled, mirrored):
        assert not torch.allclose(cached_loss, broken, rtol=1e-5, atol=1e-6)


def _train(root: Path, model, lat, cfg: TrainSection, monkeypatch, faults: dict | None = None, **inputs):
    root.mkdir(parents=True, exist_ok=True)
    fault_file = root / "faults.json"
    fault_file.write_text(json.dumps(faults or {}))
    monkeypatch.setenv(FAULTS_ENV, str(fault_file))
    train_inputs = train.TrainInputs(model, lat, INSTANCE_PROMPT, inputs.get("class_prompt"),
                                     inputs.get("prior_weight", 0.0))  # fmt: skip
    return train.run(cfg, train_inputs, Store(root))


def _exported(root: Path, model, trained) -> Path:
    """The export stage's model folder for a training: what users load."""
    return export.run(ExportSection(), export.ExportInputs(model, trained, False), Store(root)).path / MODEL_DIR


@pytest.mark.training
def test_sd15_full_finetune_outputs_reload_with_diffusers(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    model, _, lat = _encoded(workspace, "tiny-sd15", workspace / "images")
    cfg = TrainSection(steps=3, learning_rate=1e-3, checkpoint_every=0)
    dump = {"save_trainable_to": str(tmp_path / "trained.st")}
    result = _train(workspace, model, lat, cfg, monkeypatch, dump)
    assert (result.items_processed, result.items_cached, result.status) == (3, 0, "ran")
    trained = load_file(tmp_path / "trained.st")

    assert sorted(p.name for p in (result.path / WEIGHTS_DIR).iterdir()) == ["text_encoder", "unet"]  # as trained
    model_dir = _exported(workspace, model, result)  # as the hub holds a model: what from_pretrained loads, card
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md", "model.safetensors", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"
    ]  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    base = StableDiffusionPipeline.from_pretrained(model.path)
    for prefix, module, base_module in [("unet.", pipe.unet, base.unet), ("text_encoder_0.", pipe.text_encoder,
                                                                        base.text_encoder)]:  # fmt: skip
        state = module.state_dict()
        weights = {k.removeprefix(prefix): v for k, v in trained.items() if k.startswith(prefix)}
        assert weights and all(torch.equal(state[k], v) for k, v in weights.items())
        assert any(not torch.equal(v, base_module.state_dict()[k]) for k, v in weights.items())

    single = StableDiffusionPipeline.from_single_file(model_dir / "model.safetensors", config=str(model_dir))
    for name in ("unet", "vae", "text_encoder"):
        reloaded, saved = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(reloaded[k], saved[k]) for k in saved), name
    metrics = (result.path / "metrics.csv").read_text().splitlines()  # the training's records: beside the weights
    assert metrics[0] == "step,loss,lr,seconds" and len(metrics) == 4
    card = ModelCard.load(model_dir / "README.md").data
    assert (card.base_model, card.instance_prompt) == (None, INSTANCE_PROMPT)  # a preset is no hub repository
    assert card.widget == [{"text": INSTANCE_PROMPT}]  # keyed with the model, so a cached card is never stale
    assert card.tags == ["boothflow", "dreambooth", "stable-diffusion", "text-to-image"]


@pytest.mark.training
def test_killed_training_resumes_from_its_checkpoint_bit_for_bit(workspace: Path, tmp_path: Path, monkeypatch):
    model, _, lat = _encoded(workspace, "tiny-sd15", workspace / "images")
    cfg = TrainSection(steps=5, learning_rate=1e-3, checkpoint_every=2, train_text_encoder=False)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(StageError) as killed:
        _train(interrupted, model, lat, cfg, monkeypatch, {"kill_train_after_step": 3})
    assert killed.value.item == "step 4" and "exited with code" in killed.value.message
    key = train.stage_key_for(cfg, train.TrainInputs(model, lat, INSTANCE_PROMPT, None, 0.0))
    assert Store(interrupted).get("train", key) is None
    assert [p.name for p in complete_checkpoints(train.checkpoints_dir(Store(interrupted), key))] == ["step-000002"]

    resumed = _train(interrupted, model, lat, cfg, monkeypatch, {"save_trainable_to": str(tmp_path / "a.st")})
    assert (resumed.items_processed, resumed.items_cached) == (3, 2)
    straight = _train(
        tmp_path / "straight", model, lat, cfg, monkeypatch, {"save_trainable_to": str(tmp_path / "b.st")}
    )
    assert (straight.items_processed, straight.items_cached) == (5, 0)
    a, b = load_file(tmp_path / "a.st"), load_file(tmp_path / "b.st")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        [row.split(",")[1] for row in (r.path / "metrics.csv").read_text().splitlines()[1:]]
        for r in (resumed, straight)
    ]
    assert len(losses[0]) == 5 and losses[0] == losses[1]


@pytest.mark.training
def test_each_step_logs_the_learning_rate_it_trained_with(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    model, _, lat = _encoded(workspace, "tiny-sd15", workspace / "images")
    cfg = TrainSection(steps=4, learning_rate=1e-3, lr_scheduler="linear", lr_warmup_steps=2, checkpoint_every=0,
                       train_text_encoder=False)  # fmt: skip
    result = _train(tmp_path, model, lat, cfg, monkeypatch)
    logged = [float(row.split(",")[2]) for row in (result.path / "metrics.csv").read_text().splitlines()[1:]]
    # diffusers' linear schedule at step indices 0-3: warm-up over 2 steps from 0, then down to 0 at step 4
    assert logged == pytest.approx([0.0, 5e-4, 1e-3, 5e-4], abs=1e-12)


@pytest.mark.training
def test_a_nan_loss_stops_at_once_naming_the_step_and_keeps_the_last_checkpoint(
    workspace: Path, tmp_path: Path, monkeypatch
) -> None:
    model, _, lat = _encoded(workspace, "tiny-sd15", workspace / "images")
    cfg = TrainSection(steps=6, checkpoint_every=2, train_text_encoder=False)
    with pytest.raises(StageError) as err:
        _train(tmp_path, model, lat, cfg, monkeypatch, {"nan_at_step": 4})
    assert err.value.message == "loss is nan at step 4; stopped" and err.value.item == "step 4"
    key = train.stage_key_for(cfg, train.TrainInputs(model, lat, INSTANCE_PROMPT, None, 0.0))
    assert [p.name for p in complete_checkpoints(train.checkpoints_dir(Store(tmp_path), key))] == ["step-000002"]


def _lora_pairs(trained: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """UNet module name -> (A, B) of each trained LoRA adapter."""
    pairs = {}
    for name, a in trained.items():
        if name.startswith("unet.") and ".lora_A." in name:
            module = name.removeprefix("unet.").split(".lora_A.")[0]
            pairs[module] = (a, trained[name.replace(".lora_A.", ".lora_B.")])
    return pairs


@pytest.mark.training
@pytest.mark.parametrize("weight_name", [None, "pytorch_lora_weights_kohya.safetensors"], ids=["default", "kohya"])
def test_sdxl_lora_with_prior_preservation_loads_and_fuses_to_the_trained_weights(
    workspace: Path, tmp_path_factory, monkeypatch, weight_name: str | None
) -> None:
    from diffusers import StableDiffusionXLPipeline

    from tasks.core.config import PriorSection
    from tasks.stages import class_images

    root = tmp_path_factory.getbasetemp() / "sdxl-lora"
    store = Store(root)
    model = resolve("tiny-sdxl", "", root)
    pre = preprocess.run(PreprocessSection(resolution=RESOLUTION, min_side=64),
                         preprocess.PreprocessInputs(workspace / "images", preprocess.scan(workspace / "images"), 1),
                         store)  # fmt: skip
    prior = PriorSection(enabled=True, num_images=2, steps=2)
    classes = class_images.run(prior, class_images.ClassImagesInputs(model, "a photo of toy", RESOLUTION), store)
    lat = latents.run(LatentsSection(), latents.LatentsInputs(model, pre, classes), store)
    cfg = TrainSection(method="lora", train_text_encoder=False, steps=3, learning_rate=1e-2, checkpoint_every=0)
    dump = root / "trained.safetensors"
    result = _train(root, model, lat, cfg, monkeypatch, {"save_trainable_to": str(dump)},
                    class_prompt="a photo of toy", prior_weight=1.0)  # fmt: skip
    pairs = _lora_pairs(load_file(dump))
    assert len(pairs) > 10 and result.items_processed in (0, 3)

    model_dir = _exported(root, model, result)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"
    ]  # fmt: skip
    assert ModelCard.load(model_dir / "README.md").data.instance_prompt == "a photo of sks toy"
    pipe = StableDiffusionXLPipeline.from_pretrained(model.path)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(model_dir, weight_name=weight_name)  # None: the name diffusers looks for by default
    wrapped = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == set(pairs)
    pipe.fuse_lora()
    fused = pipe.unet.state_dict()
    for module, (a, b) in pairs.items():
        key = f"{module}.base_layer.weight" if f"{module}.base_layer.weight" in fused else f"{module}.weight"
        expected = base[f"{module}.weight"] + b @ a
        assert torch.allclose(fused[key], expected, atol=1e-6), module


@pytest.mark.training
@pytest.mark.parametrize(("model_id", "method"), [("tiny-sd15", "full"), ("tiny-sdxl", "lora")])
def test_bf16_mixed_precision_trains_on_a_cpu(workspace: Path, tmp_path: Path, monkeypatch, model_id, method) -> None:
    """bf16 autocast runs on CPUs (fp16 does not, and the memory plan refuses it there): both methods train,
    and the child records its peak memory beside the outputs."""
    model, _, lat = _encoded(workspace, model_id, workspace / "images")
    cfg = TrainSection(method=method, train_text_encoder=method == "full", steps=2, learning_rate=1e-3,
                       checkpoint_every=0, mixed_precision="bf16")  # fmt: skip
    result = _train(tmp_path, model, lat, cfg, monkeypatch)
    losses = [float(row.split(",")[1]) for row in (result.path / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    peaks = json.loads((result.path / "memory.json").read_text())
    assert peaks["kind"] == "cpu_rss" and 100 < peaks["peak_mib"]["train"] <= peaks["peak_mib"]["export"]


def test_a_sidecar_caption_reaches_the_training_batch_for_its_image(tmp_path: Path) -> None:
    images = _images(tmp_path / "images")
    (images / "img1.txt").write_text("  a {class} drawing\nof {token}  \n")
    (images / "img2.txt").write_text("\n")  # empty: its image keeps the instance prompt
    model, pre, lat = _encoded(tmp_path, "tiny-sd15", images)
    captions = train.read_captions(DataSection(instance_dir=images, captions="sidecar", class_name="toy"))
    assert captions == {"img1": "a toy drawing of sks"}
    inputs = train.TrainInputs(model, lat, INSTANCE_PROMPT, None, 0.0, pre, captions)
    job = train.make_job(TrainSection(batch_size=3), inputs, tmp_path / "out", tmp_path / "ckpt", None)
    [row] = [r for r in read_rows(pre.path / "items.csv", "preprocess", "test") if r["source"] == "img1.png"]
    captioned = Path(row["image"]).stem
    assert job.captions == {captioned: "a toy drawing of sks"}
    assert job.facts["captions"] == {"sidecar": 1, "instance prompt": 2}

    data = LatentData(lat.path)
    objective = Objective(DDPMScheduler.from_pretrained(model.path, subfolder="scheduler"), 0.1, 0.0, 0.0)
    batch = make_batch(data, objective, job, step=0, micro=0)
    drawn = [data.pick("instance", slot, 0) for slot in range(3)]
    assert sorted(drawn) == data.ids["instance"] and captioned in drawn
    assert batch.prompts == ["a toy drawing of sks" if s == captioned else INSTANCE_PROMPT for s in drawn]
    encoders = text.load_text_encoders(model.path, model.family)
    with torch.no_grad():
        hidden = Conditioner(job, encoders, torch.device("cpu"))(batch.prompts).hidden
        tokenizers = text.load_tokenizers(model.path, model.family)
        alone = {p: text.encode(model.family, encoders, text.tokenize(tokenizers, p)).hidden for p in job.prompts()}
    row_of = drawn.index(captioned)
    assert torch.equal(hidden[row_of], alone["a toy drawing of sks"][0])  # the caption's tokens, for its image
    assert not torch.allclose(hidden[row_of], alone[INSTANCE_PROMPT][0])
    other = (row_of + 1) % 3
    assert torch.equal(hidden[other], alone[INSTANCE_PROMPT][0])
    plain = train.TrainInputs(model, lat, INSTANCE_PROMPT, None, 0.0, pre)
    assert train.stage_key_for(job.train, inputs) != train.stage_key_for(job.train, plain)


def test_a_caption_file_that_is_not_text_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    images = _images(tmp_path / "images", 1)
    (images / "img0.txt").write_bytes(b"\xff\xfe not utf-8")
    config = load_config(None, [f"data.instance_dir='{images}'", "data.captions='sidecar'"], tmp_path / "a")
    with pytest.raises(ConfigError) as caught:
        check_before_start(config)
    assert str(caught.value) == (f"data.captions = 'sidecar': {images / 'img0.txt'}: caption file is not UTF-8 "
                                 "text; fix or remove it")  # fmt: skip


def test_more_training_processes_than_cuda_devices_stop_the_run_before_it_starts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    images = _images(tmp_path / "images", 1)
    config = load_config(None, [f"data.instance_dir='{images}'", "train.num_processes=2"], tmp_path / "a")
    with pytest.raises(ConfigError) as caught:
        check_before_start(config)
    assert str(caught.value) == ("train.num_processes = 2: this machine can run at most 1 training processes (visible "
                                 "CUDA devices)")  # fmt: skip
