"""Condition-key attention bias (``UNetConfig.condition_attention_bias``): gain 0 is the base and
plain global attention; at gain 1 uniform attention gives a condition view the same share at 6
targets as at 32; view equivariance; fixed gains stored with the model; the training switch."""

import dataclasses
import math

import pytest
import torch
from tiny_models import (
    assert_fixed_gains,
    assert_gain_matters_and_permutes,
    assert_initialised_unet_equals_base,
    unet_inputs,
    unet_with,
)

from mvdpp_core import attention
from mvdpp_core.attention import attend
from mvdpp_core.config import PredictionType, preset
from mvdpp_core.geometry import epipolar_bias
from mvdpp_core.unet import MultiViewUNet, condition_key_weights
from train.config import InitSource, ModelInitConfig
from train.diagnostics import recording_attention
from train.models import build_mvdiff_model

CFG = dataclasses.replace(preset("tiny").unet, condition_attention_bias=True)


@pytest.fixture
def biased_unet() -> MultiViewUNet:
    return unet_with(CFG, "condition_bias", 1.0)


def test_off_in_the_presets_and_weights_follow_the_target_count():
    assert not preset("sd2").unet.condition_attention_bias and not preset("tiny").unet.condition_attention_bias
    weights = condition_key_weights(torch.tensor([[0, 5, 9, 32], [40, 1, 33, 2]]))
    torch.testing.assert_close(weights, torch.tensor([[0, 0, 0, math.log(3)], [math.log(2), 0, math.log(2), 0]]))


def test_zero_gain_keeps_the_diffusers_base_and_plain_global_attention():
    mv = assert_initialised_unet_equals_base(CFG)
    assert all((gain == 0).all() for gain in mv.condition_bias.buffers())
    plain = MultiViewUNet(dataclasses.replace(CFG, condition_attention_bias=False)).eval()
    plain.load_state_dict({k: v for k, v in mv.state_dict().items() if "condition_attention_bias" not in k})
    mv.set_attention_backend("sdpa")
    sample, t, ids, ctx = unet_inputs(CFG, 2, 5, size=16)
    with torch.no_grad():
        torch.testing.assert_close(mv(sample, t, ids, ctx), plain(sample, t, ids, ctx), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("targets", [6, 32])
def test_uniform_attention_gives_the_condition_half_the_mass_at_any_target_count(biased_unet, targets):
    """Zero query maps make attention uniform: without the bias a condition view draws 1/(T + 1)
    of a target query's mass, with it (gain 1) 1/2, whether T = 6 (training) or 32 (sampling)."""
    for name, module in biased_unet.unet.named_modules():
        if name.endswith("attn1"):
            module.to_q.weight.zero_()
    sample, t, _, ctx = unet_inputs(CFG, 1, targets + 1, size=8)
    ids = torch.cat([torch.randperm(32)[:targets], torch.tensor([32])])[None]
    for gain, expected in ((1.0, 0.5), (0.0, 1 / (targets + 1))):
        biased_unet.condition_bias.reset_parameters(gain)
        with recording_attention(targets + 1, 1) as records:
            biased_unet(sample, t, ids, ctx)
        assert [r.cond_mass for r in records] == pytest.approx([expected] * len(records), rel=1e-4)


@torch.no_grad()
def test_the_bias_changes_global_attention_and_permutes_with_the_views(biased_unet):
    sample, t, ids, ctx = unet_inputs(CFG, 2, 6, size=16)
    ids[:, 4:] = torch.tensor([[33, 40], [32, 35]])  # two condition views each
    assert_gain_matters_and_permutes(biased_unet, biased_unet.condition_bias, sample, t, ids, ctx)


def test_gains_are_fixed_buffers(biased_unet):
    ids = torch.tensor([[0, 9, 20, 32]])
    assert_fixed_gains(biased_unet, "condition_attention_bias", biased_unet.condition_bias.layers, 1.0, ids)


def test_training_init_starts_the_gain_and_refuses_it_for_bundles():
    init = ModelInitConfig(architecture={"unet": {"condition_attention_bias": True}}, condition_bias_gain=1.0)
    model = build_mvdiff_model(init, PredictionType.V_PREDICTION)
    assert all((layer.gain == 1).all() for layer in model.unet.condition_bias.layers)
    with pytest.raises(ValueError, match="init.condition_bias_gain=1.0 applies to new models"):
        build_mvdiff_model(
            ModelInitConfig(source=InitSource.BUNDLE, path="x.safetensors", condition_bias_gain=1.0),
            PredictionType.EPSILON,
        )


@torch.no_grad()
def test_with_the_epipolar_bias_the_two_add(monkeypatch):
    """A UNet with both biases gives every global attention layer their sum: the epipolar
    log-weights times their gain plus the condition-key weights times theirs."""
    config = dataclasses.replace(CFG, epipolar_attention=True)
    mv = unet_with(config, "condition_bias", 1.0)
    mv.epipolar.reset_parameters(0.5)
    biases = []

    def spy(q, k, v, heads, backend, bias=None):
        if bias is not None:
            biases.append(bias)
        return attend(q, k, v, heads, backend, bias)

    monkeypatch.setattr(attention, "attend", spy)
    sample, t, _, ctx = unet_inputs(config, 1, 4, size=16)
    ids = torch.tensor([[8, 3, 20, 32]])
    mv(sample, t, ids, ctx)
    assert len(biases) == 4  # the tiny preset's global attention layers (down and up)
    for bias in biases:
        tokens = bias.shape[-1] // 4
        keys = condition_key_weights(ids).repeat_interleave(tokens, dim=1)[:, None, None, :]
        expected = 0.5 * epipolar_bias(ids, tokens)[:, None] + keys
        torch.testing.assert_close(bias, expected.expand_as(bias))
