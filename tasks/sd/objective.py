"""The DreamBooth loss, configured once: offset noise, epsilon or v-prediction target, min-SNR weights, prior loss.

The training step only calls `draw`, `noisy` and `loss`; no option is tested inside the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

Target = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Objective:
    """Noise, noisy latents and the (weighted, prior-preserving) MSE loss for one scheduler's training setup."""

    def __init__(self, scheduler: DDPMScheduler, noise_offset: float, snr_gamma: float, prior_weight: float) -> None:
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.noise_offset = noise_offset
        self.prior_weight = prior_weight
        self.target = self._target(scheduler)
        self.weights = self._min_snr(scheduler, snr_gamma) if snr_gamma else torch.ones_like

    @staticmethod
    def _target(scheduler: DDPMScheduler) -> Target:
        targets: dict[str, Target] = {
            "epsilon": lambda latents, noise, t: noise,
            "v_prediction": scheduler.get_velocity,
        }
        kind = scheduler.config.prediction_type
        if kind not in targets:
            raise ValueError(f"prediction type {kind!r} is not supported; expected one of {sorted(targets)}")
        return targets[kind]

    @staticmethod
    def _min_snr(scheduler: DDPMScheduler, gamma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """Min-SNR-gamma weights (Hang et al. 2023), divided so they apply to the chosen target."""
        divisor = {"epsilon": lambda snr: snr, "v_prediction": lambda snr: snr + 1}[scheduler.config.prediction_type]

        def weights(timesteps: torch.Tensor) -> torch.Tensor:
            snr = compute_snr(scheduler, timesteps)
            return torch.clamp(snr, max=gamma) / divisor(snr)

        return weights

    def draw(self, latent: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with offset) and a timestep for one sample, from that sample's own generator."""
        noise = torch.randn(latent.shape, generator=generator, dtype=latent.dtype)
        offset = torch.randn((*latent.shape[:2], 1, 1), generator=generator, dtype=latent.dtype)
        timestep = torch.randint(0, self.num_timesteps, (latent.shape[0],), generator=generator)
        return noise + self.noise_offset * offset, timestep

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def kind_weights(self, kinds: int) -> torch.Tensor:
        """Loss weights of a batch's kinds, built on the host with the batch: instance images 1, then (with prior
        preservation) class images `prior_weight`."""
        return torch.tensor([1.0, self.prior_weight][:kinds])

    def loss(
        self,
        prediction: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        kind_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Instance MSE plus `prior_weight` x class-image MSE, each sample weighted by its timestep. The batch holds its
        kinds in the order of `kind_weights`, equally many of each, so no mask is read from the device."""
        target = self.target(latents, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        per_sample = per_sample * self.weights(timesteps.to(per_sample.device)).to(per_sample.dtype)
        per_kind = per_sample.view(len(kind_weights), -1).mean(dim=1)
        return (per_kind * kind_weights).sum()
