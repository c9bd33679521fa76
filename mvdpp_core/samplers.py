"""Samplers: flat functions over a denoiser callable, one shared signature.

A denoiser maps ``(x_t, t) -> x0`` prediction (k-diffusion's convention; the epsilon / v
conversion and classifier-free guidance live in the denoiser). Every sampler walks the
integer timesteps ``ts`` (descending) and returns the x0 prediction at the last one.
``callback(step, total, x0)`` runs after every step; raising from it cancels sampling.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from .common import parse_enum
from .schedule import NoiseSchedule, eps_from_x0

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], None]


class SamplerName(str, enum.Enum):
    DDPM = "ddpm"
    DDIM = "ddim"
    DPMPP_2M = "dpmpp_2m"


class Sampler(Protocol):
    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        schedule: NoiseSchedule,
        ts: Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor: ...


def _next_t(ts: Tensor, i: int) -> Tensor:
    return ts[i + 1] if i + 1 < len(ts) else torch.tensor(-1)


def sample_ddpm(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, ts: Tensor, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020, eq. 6-7)."""
    x0 = x
    for i, t in enumerate(ts):
        x0 = denoiser(x, t)
        s = _next_t(ts, i)
        if s >= 0:
            mean, var = schedule.q_posterior_mean_variance(x0, x, t, s)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x = mean + var.sqrt() * noise
        if callback is not None:
            callback(i + 1, len(ts), x0)
    return x0


def sample_ddim(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, ts: Tensor, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Deterministic DDIM, eta = 0 (Song et al. 2021, eq. 12)."""
    x0 = x
    for i, t in enumerate(ts):
        x0 = denoiser(x, t)
        s = _next_t(ts, i)
        if s >= 0:
            eps = eps_from_x0(x, x0, schedule.alpha_bar(t, x))
            a_s = schedule.alpha_bar(s, x)
            x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        if callback is not None:
            callback(i + 1, len(ts), x0)
    return x0


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, schedule: NoiseSchedule, ts: Tensor, *,
                    generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022, Algorithm 2)."""

    def lam(a: Tensor) -> Tensor:  # log(alpha / sigma), half log-SNR
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    x0, x0_prev, h_prev = x, None, None
    for i, t in enumerate(ts):
        x0 = denoiser(x, t)
        s = _next_t(ts, i)
        if s >= 0:
            a_t, a_s = schedule.alpha_bar(t, x), schedule.alpha_bar(s, x)
            h = lam(a_s) - lam(a_t)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = ((1 - a_s) / (1 - a_t)).sqrt() * x - a_s.sqrt() * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i + 1, len(ts), x0)
    return x0


SAMPLERS: dict[SamplerName, Sampler] = {
    SamplerName.DDPM: sample_ddpm,
    SamplerName.DDIM: sample_ddim,
    SamplerName.DPMPP_2M: sample_dpmpp_2m,
}


def get_sampler(name: SamplerName | str) -> Sampler:
    """The sampler function for a name ('ddpm', 'ddim', 'dpmpp_2m')."""
    return SAMPLERS[parse_enum(SamplerName, name, "sampler")]
