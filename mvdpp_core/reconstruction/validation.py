"""Checks on the 32 views + masks given to :func:`reconstruct`, with errors that teach."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..cameras import NUM_TARGET_VIEWS

MIN_VIEW_SIZE = 32  # below this a pixel spans > 5 cm of the unit object: the hull is meaningless
FULL_MASK_FRACTION = 0.99  # a mask covering this share of its frame carves nothing


def _as_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu().float()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float32))
    raise TypeError(f"{name} is a {type(x).__name__}; pass a torch.Tensor (or numpy array) of floats in [0, 1].")


def normalize_views(views: object) -> Tensor:
    """Views (32, h, w, 3) or (32, 3, h, w) float in [0, 1] -> (32, h, w, 3) float32."""
    t = _as_tensor(views, "views")
    if t.ndim != 4 or t.shape[0] != NUM_TARGET_VIEWS:
        raise ValueError(
            f"views has shape {tuple(t.shape)}; expected {NUM_TARGET_VIEWS} views as ({NUM_TARGET_VIEWS}, H, W, 3) "
            f"or ({NUM_TARGET_VIEWS}, 3, H, W), in rig order i = elevation * 8 + azimuth. "
            "Pass all 32 views of the sampler output."
        )
    if t.shape[-1] != 3 and t.shape[1] == 3:
        t = t.permute(0, 2, 3, 1)  # v c h w -> v h w c
    if t.shape[-1] != 3:
        raise ValueError(
            f"views has shape {tuple(t.shape)}; expected 3 RGB channels (drop alpha and pass it as masks)."
        )
    _check_finite_unit(t, "views")
    h, w = t.shape[1:3]
    if min(h, w) < MIN_VIEW_SIZE:
        raise ValueError(
            f"views are {w}x{h} px; reconstruction needs at least {MIN_VIEW_SIZE}x{MIN_VIEW_SIZE} px per view "
            "(smaller views cannot place the surface). Pass the sampler's full-size views (e.g. 256x256)."
        )
    return t.contiguous()


def normalize_masks(masks: object, views: Tensor) -> Tensor:
    """Masks (32, h, w), (32, 1, h, w) or (32, h, w, 1) in [0, 1] -> (32, h, w) float32."""
    t = _as_tensor(masks, "masks")
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    elif t.ndim == 4 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 3 or t.shape[0] != NUM_TARGET_VIEWS:
        raise ValueError(
            f"masks has shape {tuple(t.shape)}; expected ({NUM_TARGET_VIEWS}, H, W), one foreground mask per view."
        )
    if t.shape[1:] != views.shape[1:3]:
        raise ValueError(
            f"masks are {t.shape[2]}x{t.shape[1]} but views are {views.shape[2]}x{views.shape[1]} (W x H); "
            "views and masks must have the same size: resize the masks to the views."
        )
    _check_finite_unit(t, "masks")
    if not (t > 0.5).any():
        raise ValueError(
            "masks are empty (no pixel > 0.5 in any of the 32 views), so there is no object to reconstruct; "
            "check that masks are foreground = 1 (invert them if the background is 1)."
        )
    coverage = (t > 0.5).flatten(1).float().mean(1)  # v
    if bool((coverage >= FULL_MASK_FRACTION).all()):
        raise ValueError(
            f"masks are 1 (object) over at least {FULL_MASK_FRACTION:.0%} of the frame in all "
            f"{NUM_TARGET_VIEWS} views, so they outline nothing and the object cannot be carved out; "
            "pass masks with the object = 1 and the background = 0 (an all-one placeholder mask or an "
            "inverted mask whose object is 0 gives this)."
        )
    return t.contiguous()


def check_resolution(resolution: object) -> int:
    """An integer grid resolution in 16..1024 (integer-like numpy scalars accepted)."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(
            f"resolution={resolution!r} ({type(resolution).__name__}); pass a whole number of grid cells "
            "in 16..1024, e.g. resolution=128."
        )
    resolution = int(resolution)
    if not 16 <= resolution <= 1024:
        raise ValueError(f"resolution={resolution}; allowed 16..1024 grid cells (128 is a good default).")
    return resolution


def _check_finite_unit(t: Tensor, name: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        views = torch.nonzero(bad.flatten(1).any(1)).flatten().tolist()
        raise ValueError(
            f"{name} contain NaN or infinite pixels in view(s) {views}; pass finite values in [0, 1] "
            "(e.g. torch.nan_to_num(x).clamp(0, 1))."
        )
    lo, hi = t.min().item(), t.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{name} range from {lo:.3g} to {hi:.3g}; expected floats in [0, 1] "
            "(divide 8-bit images by 255, or map [-1, 1] with (x + 1) / 2)."
        )
