"""The discrete forward process (Ho et al. 2020) in float64, and eps / v / x0 conversions.

Notation as in improved-diffusion: ``alpha_bar[t] = prod_{i<=t} (1 - beta_i)``,
``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``, and the v-parameterisation of
Salimans & Ho 2022: ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``. Every table is
float64; values are cast to the tensor's dtype where they are used.
"""

from __future__ import annotations

import enum
import operator

import torch
from torch import Tensor

from .config import BetaSchedule, PredictionType, ScheduleConfig


class TimestepSpacing(str, enum.Enum):
    """How sampling steps are placed on the 1000 training timesteps."""

    TRAILING = "trailing"  # even in t, from T-1 down to 0 (DDPM, DDIM)
    LOGSNR = "logsnr"  # even in log-SNR: what multistep solvers' error bounds assume


class NoiseSchedule:
    """Tables of the forward process, float64 on the CPU."""

    def __init__(self, *, config: ScheduleConfig):
        self.config = config
        T = config.num_train_timesteps
        if config.beta_schedule is BetaSchedule.SCALED_LINEAR:
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if config.zero_terminal_snr:
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)
            betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> PredictionType:
        return self.config.prediction_type

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar at integer timesteps t (any shape; -1 means "clean", alpha_bar = 1),
        broadcastable against ``like`` (t's shape followed by singleton dims), in its dtype."""
        t = torch.as_tensor(t, device="cpu").long()
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        a = a.reshape(*a.shape, *([1] * (like.ndim - a.ndim)))
        return a.to(device=like.device, dtype=like.dtype)

    def log_snr(self) -> Tensor:
        """lambda_t = log(alpha_bar / (1 - alpha_bar)) for every training timestep, (T,)."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    def timesteps(self, steps: int, spacing: TimestepSpacing | str = TimestepSpacing.TRAILING) -> Tensor:
        """Integer timesteps from T-1 down to 0 (descending, distinct).

        ``logsnr`` spacing can merge steps where the 1000 discrete timesteps are coarser than
        the spacing (near t = 0), so it may return fewer than ``steps`` timesteps.
        """
        T = self.num_train_timesteps
        steps = _check_steps(steps, T)
        if steps == 1:  # one step: the x0 prediction from pure noise, at the top of the schedule
            return torch.tensor([T - 1])
        if TimestepSpacing(spacing) is TimestepSpacing.TRAILING:
            return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive()
        lam = self.log_snr()  # decreasing in t
        targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
        ts = torch.searchsorted(-lam, -targets).clamp(max=T - 1)  # first t with lam_t <= target
        ts[0], ts[-1] = T - 1, 0  # both ends exactly, whatever the rounding
        return ts.unique_consecutive()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x0) = N(sqrt(a) x0, (1 - a) I) (Ho et al. eq. 4)."""
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """q(x_s | x_t, x0) for s < t (Ho et al. eq. 6-7, generalised to strided steps).

        With ``a_ts = a_t / a_s`` and ``b_ts = 1 - a_ts``:
        mean = sqrt(a_s) b_ts / (1 - a_t) x0 + sqrt(a_ts) (1 - a_s) / (1 - a_t) x_t,
        variance = (1 - a_s) / (1 - a_t) b_ts.
        """
        a_t, a_s = self.alpha_bar(t, x_t), self.alpha_bar(s, x_t)
        a_ts = a_t / a_s
        b_ts = 1 - a_ts
        mean = a_s.sqrt() * b_ts / (1 - a_t) * x0 + a_ts.sqrt() * (1 - a_s) / (1 - a_t) * x_t
        variance = (1 - a_s) / (1 - a_t) * b_ts
        return mean, variance

    def predict_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 from the model's output under this schedule's prediction type."""
        a = self.alpha_bar(t, x_t)
        if self.prediction_type is PredictionType.EPSILON:
            return x0_from_eps(x_t, model_output, a)
        return x0_from_v(x_t, model_output, a)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model should output at (x0, noise, t): epsilon or v."""
        if self.prediction_type is PredictionType.EPSILON:
            return noise
        return v_from_x0_eps(x0, noise, self.alpha_bar(t, x0))


# The last step's alpha_bar under ``zero_terminal_snr``: 0 in theory, this in the tables, so that
# log-SNR solvers stay finite (diffusers does the same); its signal, 2**-12 of x0, is below bf16's step.
TERMINAL_ALPHA_BAR = 2.0**-24


def zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so the first step keeps its value and the last is 0
    (Lin et al. 2024, Algorithm 1), then lift the last to ``TERMINAL_ALPHA_BAR``."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = TERMINAL_ALPHA_BAR
    return rescaled


def _check_steps(steps: object, T: int) -> int:
    """Steps as an int in 1..T; integer numpy / torch scalars pass, floats and strings do not."""
    hint = "Use e.g. 75 (the paper's DDPM) or 20-50 for DDIM / DPM-Solver++."
    if isinstance(steps, bool):
        raise TypeError(f"steps={steps!r} must be an integer in 1..{T}. {hint}")
    try:
        steps = operator.index(steps)
    except TypeError:
        example = f" (steps={int(steps)})" if isinstance(steps, float) and steps.is_integer() else ""
        kind = type(steps).__name__
        raise TypeError(f"steps={steps!r} ({kind}) must be an integer{example}; allowed 1..{T}. {hint}") from None
    if not 1 <= steps <= T:
        raise ValueError(f"steps={steps}; allowed 1..{T}. {hint}")
    return steps


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v
