"""Schedule identities and samplers against an oracle denoiser with a known answer.

Data: x0 ~ N(mu, s^2) per coordinate. Then E[x0 | x_t] is linear in x_t (the oracle), and
the probability-flow ODE keeps z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) constant, so
the exact ODE end point of any starting noise is known in closed form.
"""

import math

import numpy as np
import pytest
import torch

from mvdpp_core.config import PredictionType, ScheduleConfig
from mvdpp_core.samplers import get_sampler
from mvdpp_core.schedule import (
    NoiseSchedule,
    eps_from_v,
    eps_from_x0,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)

MU, S = 0.7, 0.3
SCHEDULE = NoiseSchedule(config=ScheduleConfig())


def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = SCHEDULE.alpha_bar(t, x)
    return MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)


def exact_answer(x_T: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """x0 prediction at the last timestep on the exact ODE trajectory from x_T."""
    def marginal_std(t):
        a = SCHEDULE.alpha_bar(t, x_T)
        return a.sqrt(), (a * S**2 + 1 - a).sqrt()

    (ra, sd), (ra_end, sd_end) = marginal_std(ts[0]), marginal_std(ts[-1])
    z = (x_T - ra * MU) / sd
    return oracle(ra_end * MU + sd_end * z, ts[-1])


def test_schedule_is_float64_scaled_linear():
    assert SCHEDULE.betas.dtype == torch.float64
    assert SCHEDULE.betas[0].item() == pytest.approx(0.00085)
    assert SCHEDULE.betas[-1].item() == pytest.approx(0.012)
    assert math.sqrt(SCHEDULE.betas[500].item()) == pytest.approx((0.00085**0.5 + 0.012**0.5) / 2, rel=1e-3)


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1000, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (1000,), generator=g)
    a = SCHEDULE.alphas_cumprod[t]
    x_t = SCHEDULE.q_sample(x0, t, eps)
    v = v_from_x0_eps(x0, eps, a)
    for got, want in ((x0_from_eps(x_t, eps, a), x0), (eps_from_x0(x_t, x0, a), eps),
                      (x0_from_v(x_t, v, a), x0), (eps_from_v(x_t, v, a), eps)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("prediction", list(PredictionType))
def test_predict_x0_inverts_training_target(prediction):
    schedule = NoiseSchedule(config=ScheduleConfig(prediction_type=prediction))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 900, 400, 999])
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(schedule.predict_x0(schedule.training_target(x0, eps, t), x_t, t), x0)


def test_ddpm_posterior_matches_gaussian_conditioning():
    """q(x_s | x_t, x0) from Bayes: q(x_s | x0) = N(sqrt(a_s) x0, 1 - a_s) times
    q(x_t | x_s) = N(sqrt(a_t / a_s) x_s, 1 - a_t / a_s), by precision weighting."""
    g = torch.Generator().manual_seed(2)
    x0, x_t = torch.randn(2, 50, generator=g, dtype=torch.float64)
    for t, s in ((999, 500), (300, 299), (50, 0)):
        a_t, a_s = SCHEDULE.alphas_cumprod[t], SCHEDULE.alphas_cumprod[s]
        prior_mean, prior_var = a_s.sqrt() * x0, 1 - a_s
        gain, lik_var = (a_t / a_s).sqrt(), 1 - a_t / a_s
        var = 1 / (1 / prior_var + gain**2 / lik_var)
        mean = var * (prior_mean / prior_var + gain * x_t / lik_var)
        got_mean, got_var = SCHEDULE.q_posterior_mean_variance(x0, x_t, torch.tensor(t), torch.tensor(s))
        torch.testing.assert_close(got_mean, mean)
        torch.testing.assert_close(got_var.reshape(()), var)


def _max_error(name: str, steps: int, spacing: str) -> float:
    ts = SCHEDULE.timesteps(steps, spacing)
    x_T = torch.randn(2000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return (get_sampler(name)(oracle, x_T, SCHEDULE, ts) - exact_answer(x_T, ts)).abs().max().item()


@pytest.mark.parametrize("name, steps, spacing, tol", [
    ("ddim", 1000, "trailing", 5e-3),
    ("dpmpp_2m", 40, "logsnr", 5e-3),
])
def test_deterministic_samplers_reach_the_exact_ode_answer(name, steps, spacing, tol):
    err = _max_error(name, steps, spacing)
    assert err < tol, f"{name} with {steps} steps: max error {err:.2e}"


def test_convergence_orders_ddim_first_dpmpp_second():
    """Doubling the steps halves DDIM's error (order 1) and quarters DPM-Solver++(2M)'s (order 2)."""
    ddim = _max_error("ddim", 100, "trailing") / _max_error("ddim", 200, "trailing")
    dpm = _max_error("dpmpp_2m", 20, "logsnr") / _max_error("dpmpp_2m", 40, "logsnr")
    assert 1.7 < ddim < 2.5
    assert dpm > 3.0  # 3.4 measured; tends to 4 as steps grow


def test_dpmpp_is_more_accurate_than_ddim_at_equal_steps():
    assert _max_error("dpmpp_2m", 20, "logsnr") < _max_error("ddim", 20, "trailing") / 5


def test_ddpm_ancestral_samples_the_data_distribution():
    # The full 1000-step chain is exact in the limit; strided chains with the posterior
    # variance are known to shrink the variance (Bao et al. 2022), so they are not tested here.
    ts = SCHEDULE.timesteps(1000)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(10000, generator=g, dtype=torch.float64)
    out = get_sampler("ddpm")(oracle, x_T, SCHEDULE, ts, generator=g)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, rel=0.03)


SPACINGS = {"ddpm": "trailing", "ddim": "trailing", "dpmpp_2m": "logsnr"}  # as the pipeline places them


@pytest.mark.parametrize("name", list(SPACINGS))
def test_few_step_sampling_starts_at_the_top_and_lands_on_the_data(name):
    """At 1, 2 and 3 steps every sampler starts from pure noise at t = T-1 and ends at t = 0:
    one step is the oracle's x0 prediction at T-1; the outputs keep the data's mean and never
    spread wider than it (a start at t = 0 would return the noise itself, std 1); deterministic
    samplers get closer to the exact ODE end point with every step added."""
    full = SCHEDULE.timesteps(1000)
    errors = []
    for steps in (1, 2, 3):
        ts = SCHEDULE.timesteps(steps, SPACINGS[name])
        g = torch.Generator().manual_seed(3)
        x_T = torch.randn(20000, generator=g, dtype=torch.float64)
        calls = []

        def spy(x, t, calls=calls):
            calls.append(int(t))
            return oracle(x, t)

        out = get_sampler(name)(spy, x_T, SCHEDULE, ts, generator=g)
        assert calls[0] == SCHEDULE.num_train_timesteps - 1 and len(calls) == steps
        assert calls == sorted(calls, reverse=True) and (steps == 1 or calls[-1] == 0)
        if steps == 1:
            torch.testing.assert_close(out, oracle(x_T, torch.tensor(999)))
        assert out.mean().item() == pytest.approx(MU, abs=0.02)
        assert out.std().item() < S
        errors.append((out - exact_answer(x_T, full)).abs().mean().item())
    if name != "ddpm":
        assert errors[0] >= errors[1] > errors[2], errors


def test_steps_accept_integer_scalars_and_refuse_floats():
    torch.testing.assert_close(SCHEDULE.timesteps(np.int64(5)), SCHEDULE.timesteps(5))
    with pytest.raises(TypeError, match=r"steps=2.0 \(float\) must be an integer \(steps=2\); allowed 1..1000"):
        SCHEDULE.timesteps(2.0)
    with pytest.raises(TypeError, match=r"steps=2.5 \(float\) must be an integer; allowed 1..1000"):
        SCHEDULE.timesteps(2.5)  # no integer to suggest


def test_samplers_call_back_every_step_and_cancel_by_raising():
    ts = SCHEDULE.timesteps(10)
    seen = []

    class Cancelled(Exception):
        pass

    def callback(step, total, x0):
        seen.append((step, total))
        if step == 4:
            raise Cancelled

    for name in ("ddpm", "ddim", "dpmpp_2m"):
        seen.clear()
        with pytest.raises(Cancelled):
            get_sampler(name)(oracle, torch.zeros(3, dtype=torch.float64), SCHEDULE, ts,
                              generator=torch.Generator().manual_seed(0), callback=callback)
        assert seen == [(1, 10), (2, 10), (3, 10), (4, 10)]


def test_logsnr_spacing_is_even_in_log_snr_and_distinct():
    ts = SCHEDULE.timesteps(10, "logsnr")
    assert len(ts) == 10 and ts[0] == 999 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    gaps = SCHEDULE.log_snr()[ts].diff()[:-2]  # the last gaps are limited by t being integer
    assert gaps.max() / gaps.min() < 1.1


def test_bad_sampler_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="steps=0; allowed 1..1000"):
        SCHEDULE.timesteps(0)


def _gaussian_oracle(schedule: NoiseSchedule):
    """The exact x0 predictor for data N(MU, S^2) under ``schedule``."""
    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_bar(t, x)
        return MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
    return predict


ZERO_SNR = NoiseSchedule(config=ScheduleConfig(prediction_type=PredictionType.V_PREDICTION, zero_terminal_snr=True))


def test_zero_terminal_snr_leaves_no_signal_at_the_last_step():
    """SD's schedule keeps sqrt(alpha_bar) = 0.068 of x0 at t = 999 (what training sees and sampling
    from pure noise does not); rescaled, the last step holds none and the first is unchanged."""
    base, zero = SCHEDULE.alphas_cumprod, ZERO_SNR.alphas_cumprod
    assert base[-1].item() == pytest.approx(0.00466, rel=1e-2)
    assert zero[-1].item() == 2.0**-24 and (zero[-1] / (1 - zero[-1])).item() < 1e-7
    assert zero[0].item() == pytest.approx(base[0].item(), rel=1e-12)
    assert (zero[1:] < zero[:-1]).all() and (zero <= base).all()
    assert ((ZERO_SNR.betas > 0) & (ZERO_SNR.betas <= 1)).all()
    torch.testing.assert_close(torch.cumprod(1 - ZERO_SNR.betas, 0), zero)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 100000, generator=g, dtype=torch.float64)
    t = torch.full((100000,), 999)
    corr = lambda s: torch.corrcoef(torch.stack([s.q_sample(x0, t, eps), x0]))[0, 1].item()  # noqa: E731
    assert corr(SCHEDULE) == pytest.approx(0.068, abs=0.01) and abs(corr(ZERO_SNR)) < 0.01


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_one_step_from_noise_is_the_data_mean_only_without_a_terminal_signal(name):
    """From pure noise at t = T-1, the exact denoiser's one-step answer is the data mean under the
    zero-SNR schedule, whatever the noise; under SD's it follows the noise (the leaked signal)."""
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(10000, generator=g, dtype=torch.float64)
    zero, base = (get_sampler(name)(_gaussian_oracle(s), x_T, s, s.timesteps(1)) for s in (ZERO_SNR, SCHEDULE))
    assert zero.std().item() < 1e-4 and zero.mean().item() == pytest.approx(MU, abs=1e-4)
    assert base.std().item() > 5e-3  # 0.068 S^2 = 0.006 per unit of noise


def test_dpmpp_reaches_the_exact_ode_answer_on_the_zero_snr_schedule():
    """Log-SNR solvers stay finite at the rescaled top (alpha_bar 2**-24) and converge as before."""
    oracle = _gaussian_oracle(ZERO_SNR)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(1000, generator=g, dtype=torch.float64)
    ts = ZERO_SNR.timesteps(60, "logsnr")
    out = get_sampler("dpmpp_2m")(oracle, x_T, ZERO_SNR, ts)
    assert torch.isfinite(out).all()
    # the exact answer: the data quantile of x_T's noise quantile (the flow maps N(0, 1) onto N(MU, S^2))
    torch.testing.assert_close(out, MU + S * x_T, atol=2e-2, rtol=0)


def test_zero_terminal_snr_is_stored_with_the_model_and_needs_v_prediction(tmp_path):
    import dataclasses

    from mvdpp_core import MVDPPModel, load_checkpoint, preset, save_checkpoint

    config = preset("tiny")
    with pytest.raises(ValueError, match="zero_terminal_snr=true with prediction_type=epsilon.*use v_prediction"):
        dataclasses.replace(config, schedule=ScheduleConfig(zero_terminal_snr=True)).validate()
    schedule = ScheduleConfig(prediction_type=PredictionType.V_PREDICTION, zero_terminal_snr=True)
    model = MVDPPModel(dataclasses.replace(config, schedule=schedule))
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "zero_snr.safetensors"))
    assert loaded.config.schedule.zero_terminal_snr
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, ZERO_SNR.alphas_cumprod)
    assert not preset("tiny").schedule.zero_terminal_snr  # the paper's schedule by default


def test_training_switches_a_bundle_to_the_zero_snr_schedule_keeping_every_weight(tmp_path):
    """init.zero_terminal_snr continues a bundle trained on SD's schedule on the rescaled one (the
    schedule has no weights, so every tensor carries over) and stores it; with epsilon prediction
    the config is refused before any model is built."""
    import dataclasses

    from mvdpp_core import MVDPPModel, preset, save_checkpoint
    from train.config import InitSource, ModelInitConfig, TrainConfig, validate
    from train.models import build_mvdiff_model

    torch.manual_seed(0)
    config = preset("tiny")
    config = dataclasses.replace(config, schedule=dataclasses.replace(
        config.schedule, prediction_type=PredictionType.V_PREDICTION))
    path = save_checkpoint(MVDPPModel(config), tmp_path / "plain.safetensors")
    bundle = ModelInitConfig(source=InitSource.BUNDLE, path=str(path))
    plain = build_mvdiff_model(bundle, PredictionType.V_PREDICTION)
    switched = build_mvdiff_model(dataclasses.replace(bundle, zero_terminal_snr=True), PredictionType.V_PREDICTION)
    assert not plain.config.schedule.zero_terminal_snr and switched.config.schedule.zero_terminal_snr
    torch.testing.assert_close(switched.schedule.alphas_cumprod, ZERO_SNR.alphas_cumprod)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(switched.state_dict()[key], value, rtol=0, atol=0, msg=key)
    bad = dataclasses.replace(TrainConfig(), init=dataclasses.replace(TrainConfig().init, zero_terminal_snr=True))
    assert bad.stage.prediction_type is PredictionType.EPSILON
    with pytest.raises(ValueError, match="init.zero_terminal_snr=True with stage.prediction_type=epsilon.*allowed"):
        validate(bad)
