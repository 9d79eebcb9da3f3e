"""Run configuration: one frozen pydantic section per stage (config_load.py reads them from TOML and `--set`).

Sections are what cache keys hash, so every field says whether it can change a stage's output.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.core.values import Url, fsspec_url, image_side, no_credentials, parse_memory


class ConfigError(Exception):
    """A config file or override that cannot be used; the message is one line for the user."""


def no_key(description: str, **kwargs: Any) -> Any:
    """A field that cannot change any output, so cache keys leave it out."""
    return Field(description=description, json_schema_extra={"affects_output": False}, **kwargs)


Dtype = Literal["float32", "float16", "bfloat16"]
REVISION = r"^[A-Za-z0-9._/-]*$"  # a branch, tag or commit of a hub repo
# The samplers SD 1.5 and SDXL pipelines list as compatible (diffusers' KarrasDiffusionSchedulers) but those that need
# a library we do not install (LMSDiscreteScheduler: scipy, DPMSolverSDEScheduler: torchsde) and EDMEulerScheduler
# (for EDM-trained models): named here, so a config is checked without importing diffusers, which a fully cached run
# never needs.
Scheduler = Literal[
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler",
]  # fmt: skip
MAX_SEEDS = 10_000
MAX_STEPS = 1_000_000
MAX_BATCH = 1024
VAE_SLICING = "Decode one image at a time: a batch's decode memory over its size; pixels may move by 1 level"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def keyed(self, without: Collection[str] = ()) -> dict[str, Any]:
        """The fields that can change outputs, as plain JSON values: what a cache key hashes (less `without`,
        fields a stage keys in another form or not at all)."""
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            if name in without or (isinstance(extra, dict) and extra.get("affects_output") is False):
                data.pop(name)
        return data


class ModelSection(Section):
    id: str = Field("tiny-sd15", description="Base model: a preset name (tiny-sd15, tiny-sdxl), hub id or folder")
    revision: str = no_key(
        "Hub revision (branch, tag or commit) model.id is pinned to; keys hold the commit it names. Empty: the main "
        "branch as cached",
        default="",
        pattern=REVISION,
        max_length=255,
    )
    vae: str = Field(
        "", description="Separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix; empty: the base's"
    )
    vae_revision: str = no_key(
        "Hub revision model.vae is pinned to (as model.revision)",
        default="",
        pattern=REVISION,
        max_length=255,
    )
    safety_checker: bool = Field(
        False, description="Keep the base model's safety checker (if it has one) in the exported pipeline"
    )


class RunSection(Section):
    name: str = no_key("Run name, shown in Prefect and the report", default="demo")
    artifacts_root: Path = no_key("Folder where every stage writes its cached outputs", default=Path("artifacts"))
    device_memory: str = no_key(
        "Accelerator memory the plan checks against, e.g. 24GiB; empty: the CUDA device's (no check without CUDA)",
        default="",
    )

    concurrency_limit: str = no_key(
        "Prefect global concurrency limit whose slot each stage that loads a model holds while it runs, so runs on"
        " several workers share GPUs (sweeps on a work pool use boothflow-gpu); empty: none",
        default="",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:-]{0,99})?$",
    )

    store: str = no_key(
        "Store that many machines share: the URL of a bucket and prefix (S3 or S3-compatible, through fsspec); the "
        "artifact root is then this machine's cache of it. Empty: the artifact root alone",
        default="",
        max_length=1024,
    )
    store_options: dict[str, str | int | float | bool] = no_key(
        "fsspec options for run.store, e.g. endpoint_url for an S3-compatible server; credentials come the standard "
        "AWS ways (environment, profile), never from here",
        default_factory=dict,
    )

    @field_validator("device_memory")
    @classmethod
    def _memory_amount(cls, value: str) -> str:
        if value:
            parse_memory(value)
        return value

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return fsspec_url(value) if value else value

    @field_validator("store_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        return no_credentials(value)


class DataSection(Section):
    instance_dir: Url | Path = no_key(
        "Folder of instance images (subfolders included), or their URL (e.g. an S3 bucket and prefix, read with "
        "run.store_options)",
        default=Path("data/demo"),
        union_mode="left_to_right",
    )
    token: str = Field(
        "sks", min_length=1, pattern=r"^\S+$", description="Rare identifier token that names the subject (one word)"
    )
    class_name: str = Field("toy", description="Class noun of the subject, e.g. dog or person")
    instance_prompt: str = Field(
        "a photo of {token} {class}", min_length=1, description="Training prompt; {token} and {class} are filled in"
    )
    min_images: int = Field(3, ge=1, le=100_000, description="Fail when fewer usable instance images remain")
    captions: Literal["", "sidecar"] = Field(
        "",
        description="sidecar: a .txt beside an image is its training prompt ({token} and {class} filled in; an image"
        " without one uses the instance prompt); empty: the instance prompt for every image",
    )
    settle_minutes: float | None = no_key(
        "Leave files modified less than this many minutes ago for the next run (photos still being copied); empty: "
        "5 in a subjects night, 0 in a single run",
        default=None,
        ge=0,
        le=10_080,
    )

    def settle_seconds(self) -> float:
        return 60 * (self.settle_minutes or 0)

    @field_validator("instance_dir")
    @classmethod
    def _folder_or_url(cls, value: str | Path) -> str | Path:
        return fsspec_url(value) if isinstance(value, str) else value


class PreprocessSection(Section):
    resolution: int = Field(512, description="Output side in pixels: a multiple of 8 from 64 to 4096")
    crop: Literal["center", "face"] = Field("center", description="Square crop: centred, or around the largest face")
    min_side: int = Field(256, ge=1, description="Reject images whose shorter side is below this many pixels")
    max_pixels: int = Field(
        89_478_485, ge=1, description="Reject images with more pixels than this (decompression bombs)"
    )
    face_margin: float = Field(0.6, ge=0, description="Face crop margin around the face box, as a fraction of its size")

    @field_validator("resolution")
    @classmethod
    def _image_side(cls, value: int) -> int:
        return image_side(value)


class LatentsSection(Section):
    dtype: Dtype = Field("float32", description="VAE precision while encoding")
    flip: bool = Field(False, description="Also cache each image's mirror image; training picks one at random per step")


class PriorSection(Section):
    enabled: bool = Field(False, description="Prior preservation: train on generated class images too")
    class_prompt: str = Field(
        "a photo of {class}", min_length=1, description="Prompt for class images; {class} is filled in"
    )
    negative_prompt: str = Field("", description="Negative prompt for class images")
    num_images: int = Field(
        100, ge=1, le=100_000, description="Number of class images (more later generates only the extra ones)"
    )
    loss_weight: float = Field(1.0, ge=0, description="Weight of the class-image loss")
    scheduler: Scheduler = Field(
        "DPMSolverMultistepScheduler", description="diffusers scheduler class used to render them"
    )
    steps: int = Field(25, ge=1, le=1000, description="Inference steps per class image")
    guidance: float = Field(7.5, ge=0, le=100, description="Classifier-free guidance scale")
    seed: int = Field(0, description="Base seed; image i is rendered with its own generator seeded by (seed, i)")
    dtype: Dtype = Field("float32", description="Rendering precision (float16 needs CUDA)")
    vae_slicing: bool = Field(True, description=VAE_SLICING)
    batch_size: int = no_key("Class images rendered per batch", default=4, ge=1, le=MAX_BATCH)


class TrainSection(Section):
    method: Literal["full", "lora"] = Field("full", description="full: UNet (+ text encoder) weights; lora: adapters")
    train_text_encoder: bool = Field(True, description="Train the text encoder (full) or its LoRA (lora)")
    steps: int = Field(400, ge=1, le=MAX_STEPS, description="Optimizer steps")
    batch_size: int = Field(
        1, ge=1, le=MAX_BATCH, description="Images per micro-batch (instance; as many class images with prior)"
    )
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule (diffusers.optimization.get_scheduler)")
    lr_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Warm-up steps of the LR schedule")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs CUDA + bitsandbytes")
    adam_beta1: float = Field(0.9, description="Adam beta1")
    adam_beta2: float = Field(0.999, description="Adam beta2")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm")
    noise_offset: float = Field(0.1, ge=0, description="Offset noise: noise + offset * randn(b, c, 1, 1)")
    snr_gamma: float = Field(0.0, ge=0, description="Min-SNR loss weighting gamma; 0 turns it off")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision of the forward pass")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention kernel; xformers when installed")
    tf32: bool = Field(True, description="TF32 float32 matmuls and convolutions on CUDA; ignored (and unkeyed) on CPU")
    channels_last: bool = no_key("UNet weights in channels-last layout on CUDA (faster convolutions)", default=False)
    compile_unet: bool = no_key("torch.compile the UNet on CUDA: slower first steps, faster after", default=False)
    lora_rank: int = Field(
        4, ge=1, le=1024, description="LoRA rank; alpha equals the rank, as the saved formats assume"
    )
    lora_targets: tuple[str, ...] = Field(
        ("to_q", "to_k", "to_v", "to_out.0"), description="UNet attention projections that get LoRA adapters"
    )
    seed: int = Field(0, description="Seed of weights init, sampling order, noise and timesteps")
    sample_every: int = Field(
        0, ge=0, description="Keep weights every N steps so generate renders validation samples from them (0: off)"
    )
    pick: str = Field(
        "last",
        pattern=r"^(last|best:(clip_t|clip_i|dino|analyser))$",
        description="The weights the run exports and renders: last, or best:<clip_t|clip_i|dino|analyser> (the kept"
        " step or final weights scoring highest on the validation prompts x seeds; needs sample_every)",
    )
    pick_margin: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="With a best pick, a step before the last is kept only when it scores more than this above the"
        " final weights (in the metric's units; the analyser's is a share of images), so validation noise cannot pick",
    )
    checkpoint_every: int = no_key("Save a resumable checkpoint every N steps (0: not by steps)", default=100, ge=0)
    checkpoint_minutes: float = no_key(
        "Also save one when this many minutes passed since the last (checked at log steps; 0: not by time)",
        default=30.0,
        ge=0,
    )
    log_every: int = no_key("Read the loss from the device and report it every N steps", default=10, ge=1)
    keep_checkpoints: int = no_key("Keep the newest K checkpoints", default=2, ge=1)
    cpu_threads: int | None = no_key("Torch threads per training process on CPU (results depend on it); unset: "
                                     "OMP_NUM_THREADS where set, else 2", default=None, ge=1)  # fmt: skip
    num_processes: int = no_key(
        "Training processes (one per GPU) on this machine under accelerate; batch_size is per process", default=1, ge=1
    )

    def keyed(self, without: Collection[str] = ()) -> dict[str, Any]:
        """The batch is keyed as the global micro-batch (batch_size x num_processes), which is what is drawn: two
        processes of batch 1 are the same training as one of batch 2, and share its key. The pick is the select
        stage's: it never retrains."""
        return {**super().keyed((*without, "pick", "pick_margin")), "batch_size": self.batch_size * self.num_processes}


class ExportSection(Section):
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights of the exported model; the trained weights in the train entry stay float32"
    )
    single_file: bool = Field(True, description="sd15: also the A1111 / ComfyUI single file (model.safetensors)")
    kohya: bool = Field(True, description="sdxl LoRA: also kohya's layout (pytorch_lora_weights_kohya.safetensors)")


class GenerateSection(Section):
    prompts: tuple[str, ...] = Field(
        ("a photo of {token} {class}", "a photo of {token} {class} on the beach", "a photo of a {class}"),
        min_length=1,
        description="Prompts to render; {token} and {class} are filled in",
    )
    seeds: tuple[int, ...] = Field(
        (0, 1), min_length=1, description="Seeds (a list, or a count n for 0 to n-1); every prompt gets every seed"
    )
    negative_prompt: str = Field("", description="Negative prompt for every image")
    scheduler: Scheduler = Field("DPMSolverMultistepScheduler", description="diffusers scheduler class name")
    steps: int = Field(25, ge=1, le=1000, description="Inference steps")
    guidance: float = Field(7.5, ge=0, le=100, description="Classifier-free guidance scale")
    size: int = Field(0, ge=0, description="Image side (a multiple of 8 from 64 to 4096); 0: the training resolution")
    compare_base: bool = Field(False, description="Also render the prompts with the base model, for before/after")
    validation_prompts: tuple[str, ...] = Field(
        ("a photo of {token} {class}",),
        description="Prompts rendered from each train.sample_every checkpoint (with the validation seeds)",
    )
    validation_seeds: tuple[int, ...] = Field(
        (),
        description="Seeds of the validation prompts at each checkpoint (a list, or a count n for 0 to n-1), so the"
        " evaluate stage scores every checkpoint on as many images; empty: the first of generate.seeds",
    )
    dtype: Dtype = Field(
        "float32", description="Rendering precision; float16 needs CUDA (and, for SDXL, an fp16-safe VAE to keep it)"
    )
    vae_slicing: bool = Field(True, description=VAE_SLICING)
    vae_tiling: bool = Field(False, description="Decode large images tile by tile (less memory, seams possible)")
    batch_size: int = no_key("Images per pipeline call", default=4, ge=1, le=MAX_BATCH)

    @field_validator("size")
    @classmethod
    def _image_side(cls, value: int) -> int:
        return value and image_side(value, "0 (the training resolution) or ")

    @field_validator("seeds", "validation_seeds", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        """A count n stands for the seeds 0 to n-1; it resolves here, so keys see the same list either way."""
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= MAX_SEEDS:
                raise ValueError(f"a seed count must be 1 to {MAX_SEEDS}")
            return tuple(range(value))
        return value


class EvaluateSection(Section):
    clip_model: str = Field("", description="CLIP model (hub id or folder) for CLIP-T and CLIP-I; empty: skip")
    dino_model: str = Field("", description="DINO ViT (hub id or folder) for the DINO subject score; empty: skip")
    analyser: Literal["", "toy"] = Field(
        "", description="Score samples with a closed-form analyser: toy (for toy-sd runs); empty: none"
    )


class ReportSection(Section):
    seeds_shown: int = Field(
        8, ge=1, le=MAX_SEEDS, description="Seeds shown per prompt and model; the rest fold under 'more seeds'"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_to_evaluate(cls, values: Any) -> Any:
        moved = sorted(set(values) & set(EvaluateSection.model_fields)) if isinstance(values, dict) else []
        if moved:
            raise ValueError(f"report.{moved[0]} is now evaluate.{moved[0]}: move it to the [evaluate] section")
        return values


class PublishSection(Section):
    metric: Literal["", "clip_t", "clip_i", "dino", "analyser"] = no_key(
        "In a subjects night, the evaluate score a subject's new model must reach to replace its published one "
        "(<artifacts>/published/<subject>): no worse than the published model's by more than publish.tolerance; "
        "empty: every completed night publishes",
        default="",
    )
    tolerance: float = no_key(
        "How far below the published model's publish.metric a new model may score and still be published",
        default=0.0,
        ge=0,
        le=1,
    )


class RunConfig(Section):
    """Everything one boothflow run needs; the flow's only parameter."""

    run: RunSection = Field(default_factory=RunSection, description="Run name and artifact root")
    model: ModelSection = Field(default_factory=ModelSection, description="Base model")
    data: DataSection = Field(default_factory=DataSection, description="Instance images and prompt")
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection, description="Crop and resize")
    prior: PriorSection = Field(default_factory=PriorSection, description="Prior preservation with class images")
    latents: LatentsSection = Field(default_factory=LatentsSection, description="VAE latent cache")
    train: TrainSection = Field(default_factory=TrainSection, description="DreamBooth training")
    export: ExportSection = Field(default_factory=ExportSection, description="The formats users load")
    generate: GenerateSection = Field(default_factory=GenerateSection, description="Sample generation")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="Sample metrics")
    report: ReportSection = Field(default_factory=ReportSection, description="HTML report")
    publish: PublishSection = Field(default_factory=PublishSection, description="A subject's published model")

    def instance_prompt(self) -> str:
        return fill_prompt(self.data.instance_prompt, self.data.token, self.data.class_name)

    def class_prompt(self) -> str:
        return fill_prompt(self.prior.class_prompt, self.data.token, self.data.class_name)

    def stage_names(self) -> list[str]:
        """The stages this config runs, in order; class images only with prior preservation; with a best pick,
        the validation renders (generate), their scores (evaluate) and the selection before the export."""
        classes = ["class_images"] if self.prior.enabled else []
        picking = ["validate", "score", "select"] if self.train.pick != "last" else []
        return ["preprocess", *classes, "latents", "train", *picking, "export", "generate", "evaluate", "report"]


def fill_prompt(template: str, token: str, class_name: str) -> str:
    """Fill `{token}` and `{class}`; other braces stay as written."""
    return template.replace("{token}", token).replace("{class}", class_name)
