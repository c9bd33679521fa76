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

from .cameras import (
    AZIMUTHS_DEG,
    ELEVATIONS_DEG,
    NUM_TARGET_VIEWS,
    intrinsics,
    pixel_rays,
    project,
    rig_c2w,
    view_index,
)

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


# Epipolar attention bias (UNetConfig.epipolar_attention). A target token's ray crosses the object's
# bounding sphere along a segment; in another rig view that segment projects to a short epipolar
# segment, and only the tokens near it can show the same surface point. The bias is the log of a
# Gaussian of a token's distance (in tokens) to that segment, floored: without it, a from-scratch
# model's global attention stays uniform (entropy 0.99) and acts as a mean over all views.
OBJECT_RADIUS = math.sqrt(3) / 2  # objects fit in [-0.5, 0.5]^3 (DESIGN section 3)
EPIPOLAR_SIGMA = 1.0  # tokens
EPIPOLAR_FLOOR = -8.0  # log-weight of tokens far from the segment (e^-8 = 3e-4)


def _check_epipolar_size(size: int) -> None:
    if size > 32:
        raise ValueError(
            f"epipolar attention at {size}x{size} tokens per view needs a ({32 * size * size})^2 bias table; "
            "it is built for global attention at up to 32x32 tokens per view (the tiny preset attends at 16x16). "
            "Turn unet.epipolar_attention off for this model."
        )


def epipolar_rows(size: int, views: list[int]) -> Tensor:
    """The epipolar table's rows of the query views ``views``, computed directly from the rig's rays:
    (len(views), l, 32, l) with l = size^2 (see ``epipolar_table``)."""
    _check_epipolar_size(size)
    c2w = rig_c2w(torch.float64)
    origins, dirs = pixel_rays(c2w, intrinsics(size), size, size)  # v s s 3
    origins, dirs = origins.reshape(NUM_TARGET_VIEWS, -1, 3), dirs.reshape(NUM_TARGET_VIEWS, -1, 3)
    # The ray's segment inside the bounding sphere (its closest point when it misses the sphere).
    mid = -(origins * dirs).sum(-1)  # v l
    miss2 = (origins * origins).sum(-1) - mid**2
    half = (OBJECT_RADIUS**2 - miss2).clamp(min=0).sqrt()
    ends = torch.stack([origins + (mid - half)[..., None] * dirs, origins + (mid + half)[..., None] * dirs], 2)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(-1, 2).to(torch.float64)  # l 2
    tokens = size * size
    rows = torch.empty(len(views), tokens, NUM_TARGET_VIEWS, tokens)
    for n, i in enumerate(views):
        pix, _ = project(ends[i].reshape(-1, 3), c2w, intrinsics(size))  # j (l 2) 2, all in front of the cameras
        pix = pix.reshape(NUM_TARGET_VIEWS, tokens, 2, 2)  # j l 2 2: the projected segment's end points, in pixels
        a, b = pix[:, :, None, 0], pix[:, :, None, 1]  # j l 1 2
        ab = b - a
        u = ((centres - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)  # j l q
        closest = a + u.clamp(0, 1)[..., None] * ab
        d2 = ((centres - closest) ** 2).sum(-1)
        rows[n] = (-d2 / (2 * EPIPOLAR_SIGMA**2)).clamp(min=EPIPOLAR_FLOOR).permute(1, 0, 2).float()  # l j q
        rows[n, :, i] = 0.0
    return rows


@functools.lru_cache(maxsize=4)
def epipolar_table(size: int) -> Tensor:
    """Log-weights between the rig's tokens at ``size`` x ``size`` per view: (32 l, 32 l) with
    l = size^2, rows = query token (view-major), columns = key token. 0 within a view; between
    views ``max(-d^2 / (2 sigma^2), floor)``, d = the key token's distance to the query ray's
    epipolar segment.

    The rig turns into itself by 45 degrees about the vertical axis (view (e, a) to (e, a + 1),
    pixel for pixel), and so does the bounding sphere, so the block of query view (e, a) and key
    view (e', a') is that of (e, 0) and (e', a' - a): only the four azimuth-0 views' rows are
    computed (``epipolar_rows``; a test checks every block against them computed directly)."""
    _check_epipolar_size(size)
    azimuths, tokens = len(AZIMUTHS_DEG), size * size
    first = [view_index(e, 0) for e in range(len(ELEVATIONS_DEG))]
    rows = epipolar_rows(size, first).reshape(len(first), tokens, len(ELEVATIONS_DEG), azimuths, tokens)
    table = torch.empty(len(ELEVATIONS_DEG), azimuths, tokens, len(ELEVATIONS_DEG), azimuths, tokens)
    for a in range(azimuths):  # key azimuth a' of query azimuth a reads column a' - a of azimuth 0's rows
        table[:, a] = rows.roll(a, dims=3)
    return table.reshape(NUM_TARGET_VIEWS * tokens, NUM_TARGET_VIEWS * tokens)


def epipolar_bias(view_ids: Tensor, tokens: int, queries: slice | None = None) -> Tensor:
    """The epipolar log-weights of an object's views (b, v) (ids 0..31 rig slots, 32.. condition
    views) at ``tokens`` per view: (b, q l, v l), the rows of the query views ``queries`` (all v
    by default; under view parallelism a rank's own views) against the keys of all v views.
    Condition views are pose-free: their rows and columns hold 0 (plain global attention to and
    from them)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"epipolar attention needs square token grids; got {tokens} tokens per view.")
    table = epipolar_table(side).to(view_ids.device).view(NUM_TARGET_VIEWS, tokens, NUM_TARGET_VIEWS, tokens)
    b, v = view_ids.shape
    is_target = view_ids < NUM_TARGET_VIEWS  # b v
    slots = view_ids.clamp(max=NUM_TARGET_VIEWS - 1)
    queries = slice(None) if queries is None else queries
    q = len(range(v)[queries])
    bias = torch.empty(b, q, tokens, v, tokens, device=view_ids.device)
    for n in range(b):  # whole blocks of the table: contiguous copies, not a gather per entry
        torch.index_select(table.index_select(0, slots[n, queries]), 2, slots[n], out=bias[n])
        bias[n, ~is_target[n, queries]] = 0.0
        bias[n, :, :, ~is_target[n]] = 0.0
    return bias.reshape(b, q * tokens, v * tokens)
