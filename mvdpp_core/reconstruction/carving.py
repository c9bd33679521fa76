"""Visual-hull occupancy from the 32 masks, robust to a few wrong masks.

Each view votes with its bilinearly sampled (soft) mask value; the occupancy of a point
is the smallest vote. Sampling the soft mask instead of thresholding gives a continuous
field whose 0.5 level sits at the sub-pixel silhouette, so marching cubes is smooth.
Views that do not see a point (it projects outside the frame) do not vote against it.

Robustness: "keep a voxel if the views agree", decided per view rather than per voxel.
On a coarse grid, each view's mask is scored against the consensus of the others and the
views that contradict it are dropped (how many is found from the masks, see
:func:`find_outlier_views`); the hull of the remaining views is exact. A per-voxel order
statistic or vote would instead loosen the hull everywhere (a cube's IoU drops from 0.94
to 0.84 when each voxel may ignore 2 views), since each part of the surface is carved by
few views. Masks a few pixels off are handled before carving, by snapping their outlines
to the colour edge of the views (:mod:`.silhouettes`).

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
OUTLIER_THRESHOLD = 0.15  # share of the consensus volume a view may call background


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


def mask_field(points: Tensor, masks: Tensor, c2w: Tensor, K: Tensor) -> Tensor:
    """Occupancy in [0, 1] of world points (n, 3): the smallest vote of the views."""
    out = [view_votes(chunk, masks, c2w, K).amin(0) for chunk in points.split(_CHUNK)]
    return torch.cat(out) if out else torch.zeros(0)


def find_outlier_views(
    votes: Tensor, *, max_views: int | None = None, threshold: float = OUTLIER_THRESHOLD
) -> list[int]:
    """Views whose masks contradict the others, found without being told how many there are.

    ``votes`` (v, n): each view's mask value at n sample points. A view's score is the share
    of the consensus volume it calls background. Round 1 takes as consensus the points that
    at least 3/4 of the views call object (it contains the object while fewer than a quarter
    of the masks are wrong, however wrong they are); round 2 takes the exact hull of the
    views kept in round 1 and scores every view again, so a correct view dropped in round 1
    comes back. Correct views score ~0-5% (the consensus is a little looser than the exact
    hull); a mask missing a large part of the object, or showing something else, 20-90%.
    ``max_views`` caps the count (None: up to a quarter of the views; 0: none).
    """
    v = votes.shape[0]
    cap = v // 4 if max_views is None else max_views
    if cap <= 0:
        return []
    inside = votes > 0.5  # v n
    consensus = inside.float().mean(0) >= 0.75
    dropped: list[int] = []
    for _ in range(2):
        if not consensus.any():
            return dropped
        score = (~inside[:, consensus]).float().mean(1)  # v
        worst = torch.argsort(score, descending=True)[:cap]
        dropped = sorted(int(i) for i in worst if score[i] > threshold)
        keep = [i for i in range(v) if i not in dropped]
        consensus = inside[keep].all(0)
    return dropped


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
    outlier_views: int | None = None,
    outlier_threshold: float = OUTLIER_THRESHOLD,
) -> CarveResult:
    """Visual hull of the views on a grid over [-bound, bound]^3, robust to bad masks.

    Views whose masks contradict the others (see :func:`find_outlier_views`; how many is
    found from the masks, ``outlier_views`` only caps it, 0 trusts every mask) are dropped,
    then a point is kept when every remaining view sees foreground there: with clean masks
    this is the exact hull, with wrong masks the hull of the consistent views.

    Args:
        masks: (v, h, w) foreground masks in [0, 1] of the views c2w (v, 4, 4), K (3, 3).
        resolution: grid cells per axis (the grid has resolution + 1 points per axis);
            ``2^k * m`` sizes (e.g. 128, 256) get the coarse-to-fine speed-up.
    """
    if outlier_views is not None and not 0 <= outlier_views < len(masks) // 2:
        raise ValueError(
            f"outlier_views={outlier_views}; allowed None (found from the masks, the default) "
            f"or 0..{len(masks) // 2 - 1} (at most that many)."
        )
    levels = _levels(resolution + 1)
    grid = Grid(levels[0], bound)
    idx = torch.stack(torch.meshgrid(*[torch.arange(grid.resolution)] * 3, indexing="ij"), dim=-1)
    votes = view_votes(grid.points(idx.reshape(-1, 3)), masks, c2w, K)  # v n
    dropped = find_outlier_views(votes, max_views=outlier_views, threshold=outlier_threshold)
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

    inside = field > level
    largest = largest_component(inside)
    if np.array_equal(largest, inside):  # the usual case (the dilation and copy cost ~0.4 s at 256^3)
        return field.astype(np.float32, copy=False)
    keep = ndimage.binary_dilation(largest, iterations=1)
    return np.where(keep, field, np.minimum(field, 0.0)).astype(np.float32)


def occupancy_to_sdf(occupancy: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance (positive outside, NeuS convention) of a boolean volume, in world units."""
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(occupancy)
    outside = ndimage.distance_transform_edt(~occupancy)
    return ((outside - inside + np.where(occupancy, 0.5, -0.5)) * spacing).astype(np.float32)


__all__ = ["Grid", "carve", "mask_field", "keep_largest", "largest_component", "occupancy_to_sdf"]
