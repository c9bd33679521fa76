"""The multi-view UNet: identity with its SD base at initialisation, view equivariance,
and global (not per-view) self-attention."""

import copy
import importlib.util
import sys
import types

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_models import assert_initialised_unet_equals_base, assert_permutes_with_views, unet_inputs

from mvdpp_core.attention import AttentionBackend, EpipolarCache, attend, resolve_backend
from mvdpp_core.config import preset
from mvdpp_core.geometry import epipolar_bias
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


@pytest.mark.parametrize("installed", [True, False])
def test_backend_choice_follows_the_device_and_the_xformers_package(monkeypatch, installed: bool):
    """'auto' takes xformers only on CUDA with the package installed; 'xformers' elsewhere is refused."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" and installed else real(name, *a)
    )
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) is AttentionBackend.SDPA
    assert resolve_backend("sdpa", cuda) is AttentionBackend.SDPA
    assert resolve_backend("auto", cuda) is (AttentionBackend.XFORMERS if installed else AttentionBackend.SDPA)
    with pytest.raises(ValueError, match="xformers.*needs CUDA"):
        resolve_backend("xformers", cpu)
    if installed:
        assert resolve_backend("xformers", cuda) is AttentionBackend.XFORMERS
    else:
        with pytest.raises(ValueError, match=f"xformers installed={installed}"):
            resolve_backend("xformers", cuda)


def test_the_xformers_kernel_runs_only_without_a_bias(monkeypatch):
    """xformers' kernel is called for plain attention; a bias (epipolar, condition keys) always goes
    through SDPA, which adds it, whatever the backend (a stand-in kernel records its calls)."""
    calls = []

    def kernel(q, k, v):  # n l h d, as xformers takes them
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = kernel
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, 2, 6, 6, generator=g)
    plain = attend(q, k, v, 2, AttentionBackend.XFORMERS)
    assert calls == [(2, 6, 2, 4)]
    torch.testing.assert_close(plain, attend(q, k, v, 2, AttentionBackend.SDPA))
    biased = attend(q, k, v, 2, AttentionBackend.XFORMERS, bias)
    assert len(calls) == 1
    torch.testing.assert_close(biased, attend(q, k, v, 2, AttentionBackend.SDPA, bias))
    assert (biased - plain).abs().max() > 0.1


def test_objects_with_different_view_sets_get_their_own_epipolar_rows():
    """The bias cache shares one bias only when every object has the same views (a guidance batch),
    and scales it by each head's gain."""
    tokens, gain = 16, torch.ones(1)
    two = torch.tensor([[8, 3, 32], [3, 8, 32]])
    torch.testing.assert_close(EpipolarCache(two)(tokens, gain), epipolar_bias(two, tokens)[:, None])
    same = torch.tensor([[8, 3, 32], [8, 3, 32]])
    cache = EpipolarCache(same)
    shared = cache(tokens, gain)
    assert shared.shape[0] == 1 and shared.data_ptr() == cache._base[tokens].data_ptr()  # gain 1: no copy
    base = epipolar_bias(same, tokens)[1]
    torch.testing.assert_close(shared[0, 0], base)
    torch.testing.assert_close(cache(tokens, torch.full((2,), 0.5)), 0.5 * base[None, None])  # one head for equal gains
    torch.testing.assert_close(
        cache(tokens, torch.tensor([0.5, 2.0])), torch.tensor([0.5, 2.0])[None, :, None, None] * base
    )
