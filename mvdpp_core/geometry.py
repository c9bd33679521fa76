"""Per-token geometry for global attention: which ray each latent pixel of a view looks along.

SD-style transformer blocks carry no positional encoding, so in global attention a token
knows its view only through the timestep embedding and its position only through
convolution padding; nothing lets a target-view query find the condition-view pixels that
show the same surface. These fixed features give every token, per latent pixel:

* a view-kind flag (target, condition);
* for target views (on the fixed rig, DESIGN section 3): the Plücker coordinates of the
  pixel's camera ray ``(d, o x d)`` in the world frame; zeros for condition views, which
  stay pose-free (the paper's premise: their poses are unknown);
* for every view: sinusoidal features of the pixel's image position.

``MultiViewUNet`` projects them into the queries, keys and output of every global
self-attention layer with new weights (``GeometryEncoding``); zero-initialised, the model
still equals its SD base exactly.
"""

from __future__ import annotations

import functools
import math

import torch
from einops import rearrange
from torch import Tensor

from .cameras import NUM_TARGET_VIEWS, intrinsics, pixel_rays, rig_c2w

POSITION_FREQUENCIES = 3  # sin / cos of pi * 2^k * u for k < 3, per image axis
GEOMETRY_CHANNELS = 2 + 6 + 4 * POSITION_FREQUENCIES


@functools.lru_cache(maxsize=8)
def rig_plucker(size: int) -> Tensor:
    """Plücker coordinates ``(d, o x d)`` of the rig's pixel rays at ``size`` x ``size``: (32, 6, s, s)."""
    origins, dirs = pixel_rays(rig_c2w(torch.float64), intrinsics(size), size, size)  # v s s 3
    plucker = torch.cat([dirs, torch.cross(origins, dirs, dim=-1)], dim=-1)  # v s s 6
    return rearrange(plucker, "v h w c -> v c h w").float()


@functools.lru_cache(maxsize=8)
def image_position(size: int) -> Tensor:
    """Sinusoidal features of pixel-centre positions in [-1, 1]: (4 F, s, s)."""
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1  # s
    freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, dtype=torch.float64)  # F
    angles = coords[:, None] * freqs  # s F
    feats = torch.cat([angles.sin(), angles.cos()], dim=1)  # s 2F
    ys = feats[:, None, :].expand(size, size, -1)  # rows vary
    xs = feats[None, :, :].expand(size, size, -1)  # columns vary
    return rearrange(torch.cat([xs, ys], dim=-1), "h w c -> c h w").float()


def token_geometry(view_ids: Tensor, size: int) -> Tensor:
    """Geometry features of views with ids (n,) (0..31 rig slots, 32.. condition views):
    (n, GEOMETRY_CHANNELS, size, size) on ``view_ids``' device."""
    is_target = view_ids < NUM_TARGET_VIEWS  # n
    plucker = rig_plucker(size).to(view_ids.device)[view_ids.clamp(max=NUM_TARGET_VIEWS - 1)]  # n 6 s s
    plucker = plucker * is_target[:, None, None, None]
    flags = torch.stack([is_target, ~is_target], dim=1).float()  # n 2
    flags = flags[:, :, None, None].expand(-1, -1, size, size)
    position = image_position(size).to(view_ids.device).expand(len(view_ids), -1, -1, -1)
    return torch.cat([flags, plucker, position], dim=1)


def tokens_at(geometry: Tensor, num_tokens: int) -> Tensor:
    """Geometry (n, g, H, W) average-pooled to a square token grid of ``num_tokens``: (n, l, g)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or geometry.shape[-1] % side:
        raise ValueError(
            f"geometry of {tuple(geometry.shape[-2:])} pixels does not pool to {num_tokens} tokens; "
            "the geometry encoding needs square latents whose side is divisible by each attention grid's side."
        )
    pooled = torch.nn.functional.adaptive_avg_pool2d(geometry, side)
    return rearrange(pooled, "n g h w -> n (h w) g")
