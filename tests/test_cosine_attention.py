"""Scaled cosine attention (``UNetConfig.cosine_attention``): the logits are a per-head
temperature times cos(q, k), so the weights' scale cannot keep attention uniform; off in the
presets; view equivariance; a learned temperature with a checked range; the training switch."""

import dataclasses
import math

import pytest
import torch
from tiny_models import assert_permutes_with_views, unet_inputs

from mvdpp_core.config import PredictionType, preset
from mvdpp_core.unet import CosineAttention, CosineScale, MultiViewUNet
from train.config import ModelInitConfig
from train.diagnostics import recording_attention
from train.models import build_mvdiff_model

CFG = dataclasses.replace(preset("tiny").unet, cosine_attention=True)


def cosine_unet(seed: int = 1) -> MultiViewUNet:
    torch.manual_seed(seed)
    return MultiViewUNet(CFG).eval()


def test_off_in_the_presets():
    assert not preset("sd2").unet.cosine_attention and not preset("tiny").unet.cosine_attention
    assert MultiViewUNet(preset("tiny").unet).cosine is None


def test_logits_are_the_temperature_times_the_cosine():
    """After ``CosineScale`` the usual q k / sqrt(d) of ``attend`` is exp(log_scale[h]) cos(q, k)."""
    layer = CosineScale(heads=2)
    with torch.no_grad():
        layer.log_scale.copy_(torch.tensor([math.log(10.0), math.log(3.0)]))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 5, 8, generator=g), torch.randn(3, 7, 8, generator=g)
    qs, ks = layer(q, k)
    qh, kh, qsh, ksh = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (q, k, qs, ks))  # n h l d
    logits = qsh @ ksh.transpose(-1, -2) / 2  # sqrt(d) = 2
    cos = torch.nn.functional.cosine_similarity(qh[..., :, None, :], kh[..., None, :, :], dim=-1)
    torch.testing.assert_close(logits, torch.tensor([10.0, 3.0])[:, None, None] * cos)


@torch.no_grad()
def test_the_weights_scale_cannot_keep_attention_uniform():
    """Shrinking every global layer's query and key maps 100x (small weights: the near-uniform
    start of a from-scratch model) leaves a cosine-attention UNet unchanged; plain attention
    goes uniform and its output changes."""
    sample, t, ids, ctx = unet_inputs(CFG, 2, 4, size=16)
    for cosine in (True, False):
        mv = cosine_unet() if cosine else MultiViewUNet(dataclasses.replace(CFG, cosine_attention=False)).eval()
        out = mv(sample, t, ids, ctx)
        with recording_attention(4, 1) as before:
            mv(sample, t, ids, ctx)
        for name, module in mv.unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(0.01)
                module.to_k.weight.mul_(0.01)
        with recording_attention(4, 1) as after:
            shrunk = mv(sample, t, ids, ctx)
        if cosine:
            torch.testing.assert_close(shrunk, out, atol=1e-5, rtol=1e-4)
            assert [r.entropy for r in after] == pytest.approx([r.entropy for r in before], abs=1e-5)
        else:
            assert (shrunk - out).abs().max() > 1e-3
            assert min(r.entropy for r in after) > 0.9999  # uniform
    # At its starting temperature (10) cosine attention is not uniform at all.
    with recording_attention(4, 1) as records:
        cosine_unet()(sample, t, ids, ctx)
    assert max(r.entropy for r in records) < 0.9  # plain attention starts at 0.99


@torch.no_grad()
def test_permuting_views_with_their_ids_permutes_outputs():
    assert_permutes_with_views(cosine_unet(), *unet_inputs(CFG, 2, 6, size=16))


def test_the_temperature_is_learned_and_its_range_checked():
    mv = cosine_unet()
    assert all(torch.allclose(p, torch.tensor(math.log(10.0))) for p in mv.cosine.parameters())
    sample, t, ids, ctx = unet_inputs(CFG, 1, 3, size=16)
    mv(sample, t, ids, ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mv.cosine.parameters())
    with pytest.raises(ValueError, match=r"temperature 0.0 must lie in \(0, 100\]"):
        CosineAttention({"a": 2}, scale=0.0)
    with pytest.raises(ValueError, match=r"temperature 500.0 must lie in \(0, 100\]"):
        mv.cosine.reset_parameters(500.0)


def test_training_init_builds_it_from_the_architecture_override():
    init = ModelInitConfig(architecture={"unet": {"cosine_attention": True}})
    model = build_mvdiff_model(init, PredictionType.V_PREDICTION)
    assert model.config.unet.cosine_attention and len(model.unet.cosine.layers) == len(model.unet.cosine.names) > 0
