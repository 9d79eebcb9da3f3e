"""The objective against arithmetic done by hand: a two-step schedule whose betas are 0.5 and 0.75, so alpha-bar is
0.5 at t=0 and 0.125 at t=1, and the SNR alpha-bar / (1 - alpha-bar) is 1 and 1/7."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from tasks.sd.objective import Objective

ALPHA_BAR = (0.5, 0.125)
SNR = (1.0, 1 / 7)


def objective(kind: str = "epsilon", noise_offset: float = 0.0, snr_gamma: float = 0.0, prior: float = 0.0):
    scheduler = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.5, 0.75], prediction_type=kind)
    return Objective(scheduler, noise_offset, snr_gamma, prior)


def column(*values: float) -> torch.Tensor:
    """One value per sample, as [batch, 1, 1, 1] latents."""
    return torch.tensor(values).view(-1, 1, 1, 1)


def test_noisy_latents_mix_signal_and_noise_by_alpha_bar() -> None:
    latents, noise = column(2.0, 2.0), column(1.0, -1.0)
    noisy = objective().noisy(latents, noise, torch.tensor([0, 1]))
    expected = [math.sqrt(0.5) * 2 + math.sqrt(0.5) * 1, math.sqrt(0.125) * 2 - math.sqrt(0.875) * 1]
    torch.testing.assert_close(noisy.flatten(), torch.tensor(expected))


def test_epsilon_loss_is_the_squared_error_against_the_noise() -> None:
    prediction, noise = column(1.5), column(0.5)
    loss = objective().loss(prediction, column(3.0), noise, torch.tensor([1]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx((1.5 - 0.5) ** 2)


def test_v_prediction_target_is_sqrt_alpha_bar_noise_minus_sqrt_one_minus_alpha_bar_latents() -> None:
    latents, noise, prediction = column(2.0, 2.0), column(1.0, 1.0), column(0.0, 0.0)
    loss = objective("v_prediction").loss(prediction, latents, noise, torch.tensor([0, 1]), torch.tensor([1.0]))
    targets = [math.sqrt(a) * 1.0 - math.sqrt(1 - a) * 2.0 for a in ALPHA_BAR]
    assert loss.item() == pytest.approx(sum(v**2 for v in targets) / 2)


@pytest.mark.parametrize(
    ("kind", "weights"),
    [
        ("epsilon", (min(SNR[0], 0.5) / SNR[0], min(SNR[1], 0.5) / SNR[1])),  # 0.5 and 1
        ("v_prediction", (min(SNR[0], 0.5) / (SNR[0] + 1), min(SNR[1], 0.5) / (SNR[1] + 1))),  # 0.25 and 0.125
    ],
    ids=["epsilon", "v_prediction"],
)
def test_min_snr_weights_each_sample_by_its_clamped_snr_over_the_targets_snr(kind: str, weights) -> None:
    latents, noise = column(0.0, 0.0), column(1.0, 1.0)
    target = noise if kind == "epsilon" else column(*(math.sqrt(a) for a in ALPHA_BAR))  # v with zero latents
    prediction = target + column(1.0, 2.0)  # squared errors 1 and 4
    loss = objective(kind, snr_gamma=0.5).loss(prediction, latents, noise, torch.tensor([0, 1]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx((weights[0] * 1 + weights[1] * 4) / 2)


def test_prior_preservation_adds_the_class_images_mean_loss_times_its_weight() -> None:
    """Two instance samples, then two class samples: instance mean + 0.25 x class mean."""
    noise = column(0.0, 0.0, 0.0, 0.0)
    prediction = column(1.0, 3.0, 2.0, 4.0)  # squared errors 1, 9 | 4, 16
    prior = objective(prior=0.25)
    kinds = prior.kind_weights(2)
    assert kinds.tolist() == [1.0, 0.25] and objective(prior=0.25).kind_weights(1).tolist() == [1.0]
    loss = prior.loss(prediction, column(0, 0, 0, 0), noise, torch.tensor([1, 1, 1, 1]), kinds)
    assert loss.item() == pytest.approx((1 + 9) / 2 + 0.25 * (4 + 16) / 2)


def test_offset_noise_adds_one_value_per_sample_and_channel_scaled_by_the_offset() -> None:
    latent = torch.zeros(2, 3, 4, 4)
    noise, timesteps = objective(noise_offset=0.1).draw(latent, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)  # the same draws, in the same order, by hand
    plain = torch.randn(latent.shape, generator=generator)
    offset = torch.randn((2, 3, 1, 1), generator=generator)
    torch.testing.assert_close(noise, plain + 0.1 * offset.expand_as(plain))
    assert timesteps.shape == (2,) and set(timesteps.tolist()) <= {0, 1}


def test_each_samples_error_is_the_mean_over_its_channels_and_pixels() -> None:
    prediction = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 2, 1, 2)  # two channels of two pixels: errors 1, 4, 9, 16
    zeros = torch.zeros_like(prediction)
    loss = objective().loss(prediction, zeros, zeros, torch.tensor([1]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4)
