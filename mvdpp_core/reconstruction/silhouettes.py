"""Snap mask outlines to the colour edge of the views (masks a few pixels off, as generated ones are).

A mask dilated or eroded by 2 px moves every silhouette of the visual hull by 2 px, which
no fusion of masks alone can undo: a uniformly dilated mask set is the exact silhouette set
of a slightly fatter object. The views can: on a plain backdrop (the model's views are on
white) a pixel belongs to the object when its colour differs from the backdrop's.

Per view, within ``band`` px of the mask outline only:

* inside the mask, pixels coloured like the backdrop are cut (to their colour-estimated
  coverage ``d / d_ref``: ``d`` is the colour distance to the backdrop, ``d_ref`` the mean
  ``d`` of the sure object pixels nearby, i.e. the object's own contrast, so antialiased
  edges keep sub-pixel values);
* outside the mask, pixels clearly unlike the backdrop are added (same coverage estimate).

A view is left unchanged when colour cannot decide: the backdrop is not plain (its colours
spread too much), or the object is too close to the backdrop's colour just inside its
outline (a white object on white).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

_MAX_SPREAD = 0.15  # colour spread (90th percentile distance) above which a backdrop is not plain
_MIN_CONTRAST_SHARE = 0.8
_BACKDROP_SAMPLES = 4096  # share of near-outline object pixels that must stand out from the backdrop


def _max_filter(x: Tensor, px: int) -> Tensor:
    """Max over a (2 px + 1)^2 square around each pixel of (v, 1, h, w), as two 1-D passes
    (a 2-D max_pool costs (2 px + 1)^2 per pixel, too slow for the wide backdrop margin)."""
    k = 2 * px + 1
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, px))
    return F.max_pool2d(x, (k, 1), stride=1, padding=(px, 0))


def _grow(fg: Tensor, px: int) -> Tensor:
    """Binary (v, 1, h, w) dilated by px pixels (square element)."""
    return _max_filter(fg, px)


def _shrink(fg: Tensor, px: int) -> Tensor:
    return -_max_filter(-fg, px)


def _object_contrast(dist: Tensor, tau_obj: Tensor, band: int) -> Tensor:
    """The object's local colour distance to the backdrop (v, h, w): the mean over pixels within
    ``band`` px that are surely object (the mean, not the max, so a textured object's more
    contrasted neighbours do not make its own pixels look half-covered)."""
    peak = _max_filter(dist[:, None], band)  # v 1 h w
    # Surely object: clear of the backdrop and at least half the local peak (edge pixels,
    # partly backdrop, would pull the mean down).
    sure = ((dist[:, None] > tau_obj[:, None, None, None]) & (dist[:, None] >= 0.5 * peak)).float()
    k = 2 * band + 1

    def box(x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, (1, k), stride=1, padding=(0, band), count_include_pad=False)
        return F.avg_pool2d(x, (k, 1), stride=1, padding=(band, 0), count_include_pad=False)

    mean = box(dist[:, None] * sure) / box(sure).clamp(min=1e-6)
    return torch.maximum(mean[:, 0], tau_obj[:, None, None])


def default_band(height: int, width: int) -> int:
    """Pixels of outline error tolerated: 3 px at 256 px, scaled with the image."""
    return max(3, round(min(height, width) * 3 / 256))


def _backdrop_distance(image: Tensor, far: Tensor) -> tuple[Tensor, float] | None:
    """Colour distance (h, w) of every pixel of one view (3, h, w) to its backdrop colour (the
    median of ``far`` (h, w) pixels) and the backdrop's spread; None if there is too little
    backdrop or it is not plain. Noisy backdrops are measured again on a 3x3 box-blurred image."""
    idx = torch.nonzero(far.flatten()).squeeze(1)
    if len(idx) < 0.05 * far.numel():
        return None
    idx = idx[:: max(1, len(idx) // _BACKDROP_SAMPLES)]  # a spread-out subset is enough for a median
    for blur in (False, True):
        img = F.avg_pool2d(image[None], 3, stride=1, padding=1, count_include_pad=False)[0] if blur else image
        samples = img.flatten(1)[:, idx]  # 3 n
        bg = samples.median(dim=1).values  # 3
        spread = float(torch.quantile((samples - bg[:, None]).norm(dim=0), 0.9))
        if spread <= 0.05:
            break
    if spread > _MAX_SPREAD:
        return None
    return (img - bg[:, None, None]).norm(dim=0), spread


def snap_masks_to_color(views: Tensor, masks: Tensor, *, band: int | None = None) -> tuple[Tensor, list[int]]:
    """Masks (v, h, w) with outlines moved to the colour edge of views (v, h, w, 3), by at most
    ``band`` px; returns them and the indices of the views that were changed."""
    band = band or default_band(*masks.shape[1:])
    ys, xs = torch.nonzero((masks > 0.5).any(0), as_tuple=True)
    if len(ys) == 0:
        return masks.clone(), []
    margin = 4 * band  # the outline's neighbourhood and some backdrop around it
    y0, x0 = max(0, int(ys.min()) - margin), max(0, int(xs.min()) - margin)
    y1, x1 = int(ys.max()) + margin + 1, int(xs.max()) + margin + 1
    snapped, changed = _snap(views[:, y0:y1, x0:x1], masks[:, y0:y1, x0:x1], band)
    out = masks.clone()
    out[:, y0:y1, x0:x1] = snapped
    return out, changed


def _snap(views: Tensor, masks: Tensor, band: int) -> tuple[Tensor, list[int]]:
    """:func:`snap_masks_to_color` on a crop around the objects."""
    v, h, w = masks.shape
    images = rearrange(views, "v h w c -> v c h w")
    fg = (masks > 0.5).float()[:, None]  # v 1 h w
    far = _grow(fg, 3 * band)[:, 0] == 0  # surely backdrop
    inner = (fg - _shrink(fg, band))[:, 0] > 0  # object side of the outline, within band px
    outer = (_grow(fg, band) - fg)[:, 0] > 0  # backdrop side of the outline
    ring = (_shrink(fg, band) - _shrink(fg, 2 * band))[:, 0] > 0  # object, band..2 band px inside
    dist = torch.zeros(v, h, w)
    tau_obj = torch.zeros(v)
    use = torch.zeros(v, dtype=torch.bool)
    for i in range(v):
        measured = _backdrop_distance(images[i], far[i])
        if measured is None or not ring[i].any():
            continue
        dist[i], spread = measured
        tau_bg = max(0.04, 1.5 * spread)  # closer than this to the backdrop colour: backdrop
        tau_obj[i] = 2.5 * tau_bg  # farther than this: surely object
        # The object must stand out from the backdrop just inside its outline (not white on white).
        use[i] = (dist[i][ring[i]] > tau_obj[i]).float().mean() >= _MIN_CONTRAST_SHARE
    if not use.any():
        return masks.clone(), []
    d_ref = _object_contrast(dist, tau_obj, band)
    coverage = (dist / d_ref).clamp(0, 1)  # colour-estimated share of object in each pixel
    cut = inner & use[:, None, None]  # min(): only lowers, and only where colour says partly backdrop
    add = outer & (dist > tau_obj[:, None, None]) & use[:, None, None]
    out = torch.where(cut, torch.minimum(masks, coverage), masks)
    out = torch.where(add, torch.maximum(masks, coverage), out)
    return out, torch.nonzero(use).squeeze(1).tolist()


__all__ = ["snap_masks_to_color", "default_band"]
