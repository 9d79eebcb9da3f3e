"""Everything a training steps with, built once from its job: the models (full weights or LoRA adapters made
trainable), the optimizer, the learning-rate schedule, the objective, the data and the text conditioning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model

from tasks.core.config import TrainSection
from tasks.sd import text
from tasks.sd.device import cpu_threads
from tasks.sd.objective import Objective
from tasks.training.conditioning import Conditioner
from tasks.training.data import LatentData
from tasks.training.job import TrainJob

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lora_config(cfg: TrainSection, targets: list[str]) -> LoraConfig:
    """Alpha equals the rank: diffusers' and kohya's LoRA files do not record another alpha."""
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian", target_modules=targets)


def build_models(job: TrainJob, accelerator: Accelerator) -> tuple[torch.nn.Module, list[torch.nn.Module] | None]:
    """The UNet and (when trained) the text encoders, with LoRA adapters or full weights made trainable."""
    cfg = job.train
    frozen_dtype = DTYPES[cfg.mixed_precision] if cfg.method == "lora" else torch.float32
    # Loaded in its training precision: a float32 copy of SDXL's frozen UNet would be 10 GB for nothing.
    unet = UNet2DConditionModel.from_pretrained(job.base, subfolder="unet", torch_dtype=frozen_dtype)
    cuda = accelerator.device.type == "cuda"
    if cuda and cfg.channels_last:  # before LoRA: adapters stay contiguous, as the saved formats need them
        unet.to(memory_format=torch.channels_last)
    encoders = text.load_text_encoders(job.base, job.family) if cfg.train_text_encoder else None
    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(lora_config(cfg, list(cfg.lora_targets)))
        for encoder in encoders or []:
            encoder.requires_grad_(False)
            inject_adapter_in_model(lora_config(cfg, list(text.LORA_TARGETS)), encoder)
    for model in [unet, *(encoders or [])]:
        model.to(accelerator.device, dtype=frozen_dtype)
        model.train()
    if cfg.method == "lora":
        cast_training_params([unet, *(encoders or [])], dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders or []:
            encoder.gradient_checkpointing_enable()
    if cfg.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    if cuda and cfg.compile_unet:  # in place: the module, its parameters and its state dict keep their names
        unet.compile()
    return unet, encoders


def make_optimizer(job: TrainJob, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cfg = job.train
    if job.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)  # fmt: skip


def trainable(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{k}": p for name, m in models.items() for k, p in m.named_parameters() if p.requires_grad}


@dataclass
class Training:
    """Everything one training run steps with, built once from its job (before `accelerator.prepare`)."""

    job: TrainJob
    accelerator: Accelerator
    objective: Objective
    data: LatentData
    unet: torch.nn.Module
    encoders: list[torch.nn.Module] | None
    conditioner: Conditioner
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any

    @property
    def state(self) -> dict[str, Any]:
        """Everything a resume needs besides weights; fp16's loss scaler too, or a resumed run would start
        unscaled."""
        state = {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler}
        return state | ({"scaler": self.accelerator.scaler} if self.accelerator.scaler is not None else {})

    @property
    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.unet, *(self.encoders or [])]

    def prepare(self) -> None:
        """Every trained module goes through accelerate (so DDP averages its gradients across processes)."""
        *modules, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            *self.trained_modules, self.optimizer, self.lr_scheduler
        )
        self.unet, self.encoders = modules[0], modules[1:] or None
        self.conditioner.encoders = self.encoders


def use_tf32(enabled: bool) -> None:
    """CUDA's float32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs, float32 sums), or
    IEEE float32 throughout; the train key holds the choice."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def build_training(job: TrainJob) -> Training:
    cfg = job.train
    # Unused parameters (e.g. the last layer of an encoder whose penultimate states condition SDXL) get no gradient;
    # DDP must not wait for them. Without CUDA the processes talk over gloo.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp])  # fmt: skip
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.cpu_threads))
    if accelerator.device.type == "cuda":
        use_tf32(cfg.tf32)
    scheduler = DDPMScheduler.from_pretrained(job.base, subfolder="scheduler")
    objective = Objective(scheduler, cfg.noise_offset, cfg.snr_gamma, job.prior_weight)
    unet, encoders = build_models(job, accelerator)
    params = trainable({"unet": unet, **{f"text_encoder_{i}": e for i, e in enumerate(encoders or [])}})
    optimizer = make_optimizer(job, list(params.values()))
    # The prepared scheduler advances once per process each step, so it is sized as diffusers' scripts size it.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * cfg.num_processes,
                                 num_training_steps=cfg.steps * cfg.num_processes)  # fmt: skip
    conditioner = Conditioner(job, encoders, accelerator.device)
    return Training(job, accelerator, objective, LatentData(job.latents_dir), unet, encoders, conditioner, params,
                    optimizer, lr_scheduler)  # fmt: skip
