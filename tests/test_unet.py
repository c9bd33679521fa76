"""The multi-view UNet: identity with its SD base at initialisation, view equivariance,
and global (not per-view) self-attention."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_models import assert_initialised_unet_equals_base, assert_permutes_with_views, unet_inputs

from mvdpp_core.config import preset
from mvdpp_core.unet import MultiViewUNet

CFG = preset("tiny").unet


def _inputs(b: int, v: int, seed: int = 0, size: int = 8):
    return unet_inputs(CFG, b, v, seed, size)


@torch.no_grad()
def test_initialised_model_equals_diffusers_base_for_one_view():
    torch.manual_seed(0)
    base = UNet2DConditionModel(**CFG.diffusers_kwargs()).eval()
    mv = MultiViewUNet(CFG, copy.deepcopy(base)).eval()
    sample, t, ids, ctx = _inputs(2, 1)
    ours = mv(sample, t, ids, ctx)
    ref = base(sample[:, 0], t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(ours[:, 0], ref, atol=1e-5, rtol=1e-5)


def test_initialised_per_view_model_equals_base_on_every_view():
    assert_initialised_unet_equals_base(CFG)


@pytest.fixture
def trained_looking_unet() -> MultiViewUNet:
    """A UNet whose view embeddings are switched on, as after training."""
    torch.manual_seed(1)
    mv = MultiViewUNet(CFG).eval()
    with torch.no_grad():
        mv.unet.class_embedding.scale.fill_(0.5)
    return mv


@torch.no_grad()
def test_permuting_views_with_their_ids_permutes_outputs(trained_looking_unet):
    assert_permutes_with_views(trained_looking_unet, *_inputs(2, 6))


@torch.no_grad()
def test_view_ids_matter_once_scale_is_nonzero(trained_looking_unet):
    sample, t, ids, ctx = _inputs(1, 3)
    out = trained_looking_unet(sample, t, ids, ctx)
    other = trained_looking_unet(sample, t, (ids + 1) % 42, ctx)
    assert (out - other).abs().max() > 1e-3


@pytest.mark.parametrize("global_attention", [True, False])
@torch.no_grad()
def test_one_view_influences_the_others_only_under_global_attention(trained_looking_unet, global_attention):
    trained_looking_unet.set_attention_backend("sdpa", global_attention=global_attention)
    sample, t, ids, ctx = _inputs(1, 4)
    changed = sample.clone()
    changed[:, 0] += torch.randn_like(changed[:, 0])
    out, out_changed = trained_looking_unet(sample, t, ids, ctx), trained_looking_unet(changed, t, ids, ctx)
    assert (out[:, 0] - out_changed[:, 0]).abs().max() > 1e-3
    others = (out[:, 1:] - out_changed[:, 1:]).abs().max()
    if global_attention:
        assert others > 1e-3
    else:
        assert others == 0


@torch.no_grad()
def test_takes_any_view_count_from_1_to_42(trained_looking_unet):
    for v in (1, 42):
        sample, t, _, ctx = _inputs(1, v, size=8)
        out = trained_looking_unet(sample, t, torch.arange(v)[None], ctx)
        assert out.shape == (1, v, 4, 8, 8)
        assert torch.isfinite(out).all()


def test_unknown_attention_backend_is_refused(trained_looking_unet):
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'.*allowed"):
        trained_looking_unet.set_attention_backend("flash3")
    with pytest.raises(ValueError, match="xformers.*needs CUDA"):
        trained_looking_unet.set_attention_backend("xformers")
