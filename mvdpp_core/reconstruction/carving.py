"""Visual-hull occupancy from the 32 masks, robust to a few wrong masks.

Each view votes with its bilinearly sampled (soft) mask value; the occupancy of a point
is the smallest vote. Sampling the soft mask instead of thresholding gives a continuous
field whose 0.5 level sits at the sub-pixel silhouette, so marching cubes is smooth.
Views that do not see a point (it projects outside the frame) do not vote against it.

Robustness: "keep a voxel if all but k views agree" done per view rather than per voxel.
On a coarse grid we take the k-robust hull ((k+1)-th smallest vote), find the views whose
masks contradict it (a mask missing part of the object calls a large share of it
background) and drop at most k of them; the hull of the remaining views is exact. A
per-voxel order statistic would instead loosen the hull everywhere (a cube's IoU drops
from 0.94 to 0.84 with k = 2), since each part of the surface is carved by few views.

The field is computed coarse to fine: a full grid at low resolution, then at each finer
level only the voxels near the coarse surface are evaluated exactly (the rest are
interpolated, they are far from the 0.5 level). This keeps a 256^3 grid at ~1M exact
evaluations instead of 16.7M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK = 262_144
_COARSEST = 32


@dataclass(frozen=True)
class Grid:
    """A cubic sample grid: ``resolution`` points per axis spanning [-bound, bound] (inclusive).

    Index (i, j, k) is the point (x_i, y_j, z_k) with x_i = -bound + i * spacing.
    """

    resolution: int
    bound: float

    @property
    def spacing(self) -> float:
        return 2 * self.bound / (self.resolution - 1)

    def points(self, index: Tensor) -> Tensor:
        """Integer indices (n, 3) -> world points (n, 3) float32."""
        return index.float() * self.spacing - self.bound


def _ndc_projection(c2w: Tensor, K: Tensor, width: int, height: int) -> Tensor:
    """(v, 3, 4) matrices mapping homogeneous world points to (x, y, 1) * depth with x, y in
    grid_sample's [-1, 1] (align_corners=False) pixel frame: one einsum per chunk."""
    w2c = torch.linalg.inv(c2w.double())[:, :3]  # v 3 4
    to_ndc = torch.tensor([[2 / width, 0, -1], [0, 2 / height, -1], [0, 0, 1]], dtype=torch.float64)
    return (to_ndc @ K.double() @ w2c).float()


def view_votes(points: Tensor, masks: Tensor, c2w: Tensor, K: Tensor) -> Tensor:
    """Bilinear mask value (v, n) of world points (n, 3) in each view; 1 where a view does
    not see the point (outside its frame), so it never votes against it."""
    v, h, w = masks.shape
    proj = _ndc_projection(c2w, K, w, h)
    hom = torch.einsum("vij,nj->vni", proj[..., :3], points.float()) + proj[:, None, :, 3]  # v n 3
    depth = hom[..., 2]
    grid = hom[..., :2] / depth.clamp(min=1e-6)[..., None]  # v n 2
    vals = F.grid_sample(masks[:, None].float(), grid[:, None], mode="bilinear", padding_mode="border",
                         align_corners=False)[:, 0, 0]  # v n
    seen = (grid.abs() <= 1).all(-1) & (depth > 0)
    return torch.where(seen, vals, torch.ones_like(vals))


def mask_field(points: Tensor, masks: Tensor, c2w: Tensor, K: Tensor, outlier_views: int = 0) -> Tensor:
    """Occupancy in [0, 1] of world points (n, 3): the (k+1)-th smallest vote of the views."""
    out = []
    for chunk in points.split(_CHUNK):
        votes = view_votes(chunk, masks, c2w, K)
        if outlier_views == 0:
            out.append(votes.amin(0))
        else:  # topk is ~2x faster than kthvalue here
            out.append(torch.topk(votes, outlier_views + 1, dim=0, largest=False).values[-1])
    return torch.cat(out) if out else torch.zeros(0)


def find_outlier_views(votes: Tensor, outlier_views: int, threshold: float) -> list[int]:
    """Views whose masks contradict the robust hull, worst first (at most ``outlier_views``).

    The robust hull keeps points where all but k views see foreground. A view's score is
    the fraction of the robust hull it calls background: ~0-5% for a correct mask (the
    robust hull is a little looser than the exact one), 25-50% for a mask missing a large
    part of the object. Views above ``threshold`` are dropped.
    """
    if outlier_views == 0:
        return []
    robust = torch.topk(votes, outlier_views + 1, dim=0, largest=False).values[-1]
    inside = robust > 0.5
    if not inside.any():
        return []
    score = (votes[:, inside] < 0.5).float().mean(1)  # v
    worst = torch.argsort(score, descending=True)[:outlier_views]
    return sorted(int(i) for i in worst if score[i] > threshold)


def _levels(resolution: int) -> list[int]:
    """Grid resolutions from coarse to fine, each (r - 1) a multiple of the previous (r - 1)."""
    levels = [resolution]
    while (levels[-1] - 1) % 2 == 0 and (levels[-1] - 1) // 2 + 1 >= _COARSEST:
        levels.append((levels[-1] - 1) // 2 + 1)
    return levels[::-1]


@dataclass(frozen=True)
class CarveResult:
    """Occupancy (r, r, r) float32 in [0, 1] on ``grid``, and the views dropped as outliers."""

    occupancy: np.ndarray
    grid: Grid
    dropped_views: list[int]


def carve(
    masks: Tensor,
    c2w: Tensor,
    K: Tensor,
    *,
    resolution: int,
    bound: float = 0.6,
    outlier_views: int = 2,
    outlier_threshold: float = 0.15,
) -> CarveResult:
    """Visual hull of the views on a grid over [-bound, bound]^3, robust to bad masks.

    Up to ``outlier_views`` (k) views whose masks contradict the k-robust hull (see
    :func:`find_outlier_views`) are dropped, then a point is kept when every remaining view
    sees foreground there: with clean masks this is the exact hull (as tight as k = 0),
    with up to k wrong masks it is the hull of the consistent views.

    Args:
        masks: (v, h, w) foreground masks in [0, 1] of the views c2w (v, 4, 4), K (3, 3).
        resolution: grid cells per axis (the grid has resolution + 1 points per axis);
            ``2^k * m`` sizes (e.g. 128, 256) get the coarse-to-fine speed-up.
    """
    if not 0 <= outlier_views < len(masks) // 2:
        raise ValueError(f"outlier_views={outlier_views}; allowed 0..{len(masks) // 2 - 1} (default 2).")
    levels = _levels(resolution + 1)
    grid = Grid(levels[0], bound)
    idx = torch.stack(torch.meshgrid(*[torch.arange(grid.resolution)] * 3, indexing="ij"), dim=-1)
    votes = view_votes(grid.points(idx.reshape(-1, 3)), masks, c2w, K)  # v n
    dropped = find_outlier_views(votes, outlier_views, outlier_threshold)
    keep = [i for i in range(len(masks)) if i not in dropped]
    masks, c2w = masks[keep], c2w[keep]
    field = votes[keep].amin(0).reshape([grid.resolution] * 3)
    for res in levels[1:]:
        grid = Grid(res, bound)
        field = _refine(field, grid, masks, c2w, K)
    return CarveResult(field.numpy(), grid, dropped)


def _refine(coarse: Tensor, grid: Grid, masks: Tensor, c2w: Tensor, K: Tensor) -> Tensor:
    """Upsample a coarse field and evaluate exactly where the surface may pass.

    Features thinner than a coarse cell that no coarse point caught are lost; the coarsest
    level has 33 points per axis over [-bound, bound] (~4 cm cells).
    """
    r = grid.resolution
    fine = F.interpolate(coarse[None, None], size=(r, r, r), mode="trilinear", align_corners=True)[0, 0]
    # Cells whose coarse corners straddle the surface interpolate to values strictly
    # inside (0, 1); everything else is exactly 0 or 1 and stays so at the finer level.
    band = (fine > 1e-3) & (fine < 1 - 1e-3)
    idx = torch.nonzero(band)  # n 3
    fine[band] = mask_field(grid.points(idx), masks, c2w, K)
    return fine


def largest_component(occupancy: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 6-connected component of a boolean volume."""
    from scipy import ndimage

    labels, n = ndimage.label(occupancy)
    if n <= 1:
        return occupancy.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def keep_largest(field: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Zero the field outside (a 1-voxel dilation of) its largest inside-component."""
    from scipy import ndimage

    keep = ndimage.binary_dilation(largest_component(field > level), iterations=1)
    return np.where(keep, field, np.minimum(field, 0.0)).astype(np.float32)


def occupancy_to_sdf(occupancy: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance (positive outside, NeuS convention) of a boolean volume, in world units."""
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(occupancy)
    outside = ndimage.distance_transform_edt(~occupancy)
    return ((outside - inside + np.where(occupancy, 0.5, -0.5)) * spacing).astype(np.float32)


__all__ = ["Grid", "carve", "mask_field", "keep_largest", "largest_component", "occupancy_to_sdf"]
