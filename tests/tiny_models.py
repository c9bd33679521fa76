"""Builders of tiny, seeded models shared by the tests (no downloads, ever)."""

from __future__ import annotations

import copy

import torch

from mvdpp_core.config import UNetConfig, preset
from mvdpp_core.model import MVDPPModel


def tiny_model(seed: int = 0, *, view_scale: float = 0.0) -> MVDPPModel:
    """The ``tiny`` preset with seeded random weights; ``view_scale`` switches on the view
    embeddings (0 = as initialised)."""
    torch.manual_seed(seed)
    model = MVDPPModel(preset("tiny")).eval()
    with torch.no_grad():
        model.unet.unet.class_embedding.scale.fill_(view_scale)
    return model


def object_views(n: int = 1, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n condition views (n, 3, size, size) of a coloured disc on white, and masks (n, size, size)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, masks = [], []
    for i in range(n):
        cx, cy = size * (0.4 + 0.2 * torch.rand(2, generator=g))
        mask = (((xs - cx) ** 2 + (ys - cy) ** 2) < (size * (0.2 + 0.05 * i)) ** 2).float()
        colour = torch.rand(3, 1, 1, generator=g)
        images.append(mask * colour + (1 - mask))
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


def unet_inputs(config: UNetConfig, b: int, v: int, seed: int = 0, size: int = 8):
    """Seeded UNet inputs: 9-channel samples (b, v, 9, size, size), timesteps (b,), view ids
    (b, v) drawn from the 42 slots, and 3 context tokens (b, 3, d)."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(b, v, 9, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    ids = torch.stack([torch.randperm(42, generator=g)[:v] for _ in range(b)])
    ctx = torch.randn(b, 3, config.cross_attention_dim, generator=g)
    return sample, t, ids, ctx


@torch.no_grad()
def assert_initialised_unet_equals_base(config: UNetConfig, views: int = 5):
    """Build a ``MultiViewUNet`` from a seeded diffusers base and check that, with per-view
    attention, it equals the base on every one of ``views`` views; returns the UNet."""
    from diffusers import UNet2DConditionModel

    from mvdpp_core.unet import MultiViewUNet

    torch.manual_seed(0)
    base = UNet2DConditionModel(**config.diffusers_kwargs()).eval()
    mv = MultiViewUNet(config, copy.deepcopy(base)).eval()
    mv.set_attention_backend("sdpa", global_attention=False)
    sample, t, ids, ctx = unet_inputs(config, 1, views)
    ours = mv(sample, t, ids, ctx)
    ref = base(sample[0], t.expand(views), encoder_hidden_states=ctx.expand(views, -1, -1)).sample
    torch.testing.assert_close(ours[0], ref, atol=1e-5, rtol=1e-5)
    return mv


PERMUTATION = torch.tensor([3, 0, 5, 1, 4, 2])  # of 6 views


@torch.no_grad()
def assert_permutes_with_views(mv, sample, t, ids, ctx, out=None) -> None:
    """Permuting 6 views together with their ids permutes the UNet's outputs (``out``: the
    unpermuted output when the caller already has it)."""
    out = mv(sample, t, ids, ctx) if out is None else out
    perm = PERMUTATION
    torch.testing.assert_close(mv(sample[:, perm], t, ids[:, perm], ctx), out[:, perm], atol=1e-5, rtol=1e-4)


def assert_gain_matters_and_permutes(mv, gains, sample, t, ids, ctx) -> None:
    """At gain 1 a per-layer attention bias (``gains``, a HeadGains) changes the output against
    gain 0, and the biased UNet is equivariant to the order of the views."""
    out = mv(sample, t, ids, ctx)
    gains.reset_parameters(0.0)
    assert (mv(sample, t, ids, ctx) - out).abs().max() > 1e-3
    gains.reset_parameters(1.0)
    assert_permutes_with_views(mv, sample, t, ids, ctx, out)


def assert_fixed_gains(mv, key: str, layers, value: float, ids: torch.Tensor) -> None:
    """A bias's per-head gains (``layers``, state-dict keys containing ``key``) are buffers, not
    parameters (a backward pass through ``ids`` views gives them no gradient), and travel in the
    state dict at ``value``."""
    sample, t, _, ctx = unet_inputs(mv.config, 1, ids.shape[1], size=16)
    mv(sample, t, ids, ctx).square().mean().backward()
    assert not any(key in name for name, _ in mv.named_parameters())
    gains = {k: v for k, v in mv.state_dict().items() if key in k}
    assert len(gains) == len(layers) and all((v == value).all() for v in gains.values())


def unet_with(config: UNetConfig, part: str, value: float, seed: int = 1):
    """A seeded MultiViewUNet of ``config`` in eval mode whose optional ``part`` ("geometry",
    "epipolar" or "condition_bias") is reset with ``value`` (its init std or gain) instead of its zero start."""
    from mvdpp_core.unet import MultiViewUNet

    torch.manual_seed(seed)
    mv = MultiViewUNet(config).eval()
    getattr(mv, part).reset_parameters(value)
    return mv
