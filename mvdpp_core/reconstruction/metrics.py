"""Mesh and image metrics of the paper's evaluation (the SyncDreamer protocol).

* Chamfer distance: mean nearest-neighbour distance from samples of A to B and from B to
  A, averaged, unsquared (world units; objects normalised to a unit bounding box). The
  samples are area-uniform on the surface that bounds each solid: a face inside another
  closed part of the same mesh (a procedural object's overlapping parts) is no surface of
  the object, and its samples are left out (``bounding_surface_samples``, by the winding
  number just off each side).
* Volume IoU: occupancy at the cell centres of a 64^3 grid over the union of the two
  bounding boxes (``bounds="union"``, default) or over [-0.5, 0.5]^3 (``bounds="unit"``).
  Occupancy is the winding number along rays (signed crossings counted along x, y and z,
  majority vote), via the rasteriser: exact for closed, consistently oriented surfaces and
  for unions of them that overlap (the procedural objects' concatenated parts, whose
  overlaps ray parity would count as empty), with no extra dependency.
* PSNR and SSIM (kornia, 11 px Gaussian window) of views composited on white, averaged
  over views. LPIPS only when the ``lpips`` package and its AlexNet weights are already on
  disk; it never downloads.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import trimesh
from einops import rearrange
from numpy.typing import NDArray
from scipy.spatial import cKDTree
from torch import Tensor

from ..common import composite_on_white as on_white
from .render import iter_coverage

IOU_RESOLUTION = 64
# Rays pass a hair off the cell centres so they never graze mesh edges that lie exactly
# on a centre (which would count a crossing twice and flip the parity of a column).
_JITTER = (3.1e-4 * np.pi, 2.7e-4 * np.e)


def winding_numbers(mesh: trimesh.Trimesh, points: NDArray[np.floating], bins: int | None = None) -> NDArray[np.int64]:
    """How many closed parts of ``mesh`` hold each point (-1 per part whose faces point inward):
    the signed crossings of a ray from the point along +x, along +y and along +z, the median of
    the three (a ray that grazes an edge is outvoted). Faces are binned on a ``bins``^2 grid
    across each ray's screen (default: about one face per bin), so a point tests only the faces
    over its own bin."""
    tris = np.asarray(mesh.vertices, np.float64)[np.asarray(mesh.faces, np.int64)]  # f corner xyz
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    bins = bins or int(np.clip(np.sqrt(len(tris)), 64, 1024))
    counts = np.zeros((3, len(pts)), np.int64)
    for axis in range(3):
        uv = [(axis + 1) % 3, (axis + 2) % 3]  # cyclic: a face's screen area has its normal's sign along axis
        t2, p2 = tris[..., uv], pts[:, uv]
        lo = np.minimum(t2.min((0, 1)), p2.min(0))
        cell = np.maximum(np.maximum(t2.max((0, 1)), p2.max(0)) - lo, 1e-12) / bins
        bin_of = functools.partial(_bin_of, lo=lo, cell=cell, bins=bins)
        # The faces over each bin (a face's screen box's bins), as one list sorted by bin; faces
        # seen edge-on (no screen area) cross no ray and stay out.
        first, last = bin_of(t2.min(1)), bin_of(t2.max(1))
        span = last - first + 1
        area = _edge(t2[:, 0], t2[:, 1], t2[:, 2])  # twice the screen area, signed by the normal along axis
        seen = np.abs(area) > 1e-12 * cell.prod()
        covered = np.where(seen, span[:, 0] * span[:, 1], 0)
        listed = np.repeat(np.arange(len(tris)), covered)
        within = _ranks(covered)
        key = (first[listed, 0] + within // span[listed, 1]) * bins + first[listed, 1] + within % span[listed, 1]
        order = np.argsort(key, kind="stable")
        listed, starts = listed[order], np.searchsorted(key[order], np.arange(bins * bins + 1))
        # Every (point, face) pair that shares the point's bin.
        home = bin_of(p2) @ np.array([bins, 1])
        n = starts[home + 1] - starts[home]
        point, face = np.repeat(np.arange(len(pts)), n), listed[np.repeat(starts[home], n) + _ranks(n)]
        q, (a, b, c) = p2[point], np.moveaxis(t2[face], 1, 0)
        w = np.stack([_edge(b, c, q), _edge(c, a, q), _edge(a, b, q)])  # the sub-areas opposite a, b, c
        whole = area[face]  # listed faces only: none has zero area
        covers = ((w * whole) >= 0).all(0)
        depth = (w * np.moveaxis(tris[face][..., axis], 1, 0)).sum(0) / whole
        ahead = covers & (depth > pts[point, axis])
        counts[axis] = np.bincount(point[ahead], np.sign(whole[ahead]), minlength=len(pts)).round().astype(np.int64)
    return np.sort(counts, axis=0)[1]


def _bin_of(
    x: NDArray[np.floating], *, lo: NDArray[np.floating], cell: NDArray[np.floating], bins: int
) -> NDArray[np.int64]:
    """The bin of each 2-D point on a ``bins``^2 grid from ``lo`` in steps of ``cell``, clamped to the grid."""
    return np.clip(((x - lo) / cell).astype(np.int64), 0, bins - 1)


def _ranks(n: NDArray[np.int64]) -> NDArray[np.int64]:
    """0, 1, ..., n[i] - 1 for each i, concatenated."""
    return np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)


def _edge(p0: NDArray[np.floating], p1: NDArray[np.floating], q: NDArray[np.floating]) -> NDArray[np.floating]:
    """Twice the signed area of the 2-D triangle (p0, p1, q), rows at a time."""
    return (p1[:, 0] - p0[:, 0]) * (q[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (q[:, 0] - p0[:, 0])


def bounding_surface_samples(mesh: trimesh.Trimesh, count: int, seed: int = 0) -> NDArray[np.float64]:
    """``count`` area-uniform points on the surface that bounds the solid ``mesh`` encloses. A
    face inside another closed part (the procedural objects are overlapping parts concatenated)
    is not on it: just off such a face both sides lie inside, so its points are left out. A mesh
    without such faces gets exactly ``trimesh.sample.sample_surface(mesh, count, seed)``."""
    offset = 1e-6 * float(np.linalg.norm(mesh.extents))
    kept: list[NDArray[np.float64]] = []
    drawn, have, draw = 0, 0, count
    for attempt in range(16):
        points, face = trimesh.sample.sample_surface(mesh, draw, seed=seed + 7919 * attempt)
        step = offset * np.asarray(mesh.face_normals)[face]
        sides = winding_numbers(mesh, np.concatenate([points + step, points - step])).reshape(2, -1) != 0
        kept.append(np.asarray(points[sides[0] != sides[1]], np.float64))
        drawn, have = drawn + draw, have + len(kept[-1])
        if have >= count:
            return np.concatenate(kept)[:count]
        if not have:
            break
        draw = int((count - have) * drawn / have * 1.2) + 16  # what the kept share so far needs, and a margin
    raise ValueError(
        f"{have} of {drawn} points sampled on this mesh ({len(mesh.faces)} faces) lie on a surface that "
        f"bounds a solid (inside on one side, outside on the other), fewer than the {count} asked for. "
        "Chamfer terms need closed surfaces; close the mesh (e.g. trimesh's fill_holes) or pass a "
        "watertight reconstruction."
    )


def chamfer_terms(
    a: trimesh.Trimesh, b: trimesh.Trimesh, *, samples: int = 30_000, seed: int = 0
) -> tuple[float, float]:
    """The two halves of the Chamfer distance from ``samples`` area-uniform points each on the
    surfaces that bound the two solids (``bounding_surface_samples``): the mean distance from A's
    surface to B's (A's accuracy: surface A has where B has none) and from B's to A's (A's
    completeness: surface B has that A misses)."""
    pa = bounding_surface_samples(a, samples, seed=seed)
    pb = bounding_surface_samples(b, samples, seed=seed + 1)
    return float(cKDTree(pb).query(pa)[0].mean()), float(cKDTree(pa).query(pb)[0].mean())


def chamfer_distance(a: trimesh.Trimesh, b: trimesh.Trimesh, *, samples: int = 30_000, seed: int = 0) -> float:
    """Symmetric Chamfer distance between two surfaces from ``samples`` area-uniform points each."""
    return sum(chamfer_terms(a, b, samples=samples, seed=seed)) / 2


def occupancy(
    mesh: trimesh.Trimesh, lo: NDArray[np.floating], hi: NDArray[np.floating], resolution: int = IOU_RESOLUTION
) -> NDArray[np.bool_]:
    """Inside test at the cell centres of a ``resolution``^3 grid over the box [lo, hi]."""
    verts = torch.from_numpy(np.asarray(mesh.vertices, np.float64))
    faces = torch.from_numpy(np.asarray(mesh.faces, np.int64))
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)  # copies (read-only)
    cell = (hi_t - lo_t) / resolution
    votes = np.zeros((resolution,) * 3, np.int32)
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        # Orthographic "screen" along ``axis``; z = 1 / (coord - lo + 1) makes the
        # rasteriser's interpolated 1/z equal the crossing coordinate (shifted).
        # Kept in float64: the jitter is ~1e-3 px, and in float32 the edge functions' error
        # (|c| in the hundreds) lets two triangles both cover a centre near their shared
        # diagonal, adding a crossing to a column that leaves it "inside" past the surface.
        screen = torch.stack(
            (
                (verts[:, u] - lo_t[u]) / cell[u] + _JITTER[0],
                (verts[:, v] - lo_t[v]) / cell[v] + _JITTER[1],
                1.0 / ((verts[:, axis] - lo_t[axis]) / cell[axis] + 1.0),
            ),
            dim=-1,
        )
        tris = screen[faces]  # f, corner, (u v z)
        e1, e2 = tris[:, 1, :2] - tris[:, 0, :2], tris[:, 2, :2] - tris[:, 0, :2]
        # +1 / -1 by which way a face's normal points along ``axis`` (the same way for every face
        # of one pass, so the sign convention cancels in ``!= 0`` below).
        facing = torch.sign(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).to(torch.int32)
        counts = torch.zeros(resolution, resolution, resolution + 1, dtype=torch.int32)  # u v axis
        for tri, px, py, inv_z in iter_coverage(tris, resolution, resolution):
            k = torch.ceil(inv_z - 1.0 - 0.5).clamp(0, resolution).long()  # first centre above
            counts.index_put_((px, py, k), facing[tri], accumulate=True)
        # The winding number below each centre: how many closed parts hold it.
        inside = (torch.cumsum(counts, dim=-1)[..., :resolution] != 0).numpy()  # u v axis
        votes += np.moveaxis(inside, (0, 1, 2), (u, v, axis))
    return votes >= 2


def volume_overlap(
    a: trimesh.Trimesh, b: trimesh.Trimesh, *, resolution: int = IOU_RESOLUTION, bounds: str = "union"
) -> tuple[float, float]:
    """Volume IoU of two closed meshes on a ``resolution``^3 grid (see module docstring) and A's
    volume over B's, both counted in the grid's cells (unions of overlapping parts counted once;
    NaN ratio when B holds no cell centre)."""
    if bounds == "unit":
        lo, hi = np.full(3, -0.5), np.full(3, 0.5)
    elif bounds == "union":
        lo = np.minimum(a.bounds[0], b.bounds[0])
        hi = np.maximum(a.bounds[1], b.bounds[1])
    else:
        raise ValueError(f"bounds={bounds!r}; allowed 'union' (both bounding boxes) or 'unit' ([-0.5, 0.5]^3).")
    occ_a, occ_b = occupancy(a, lo, hi, resolution), occupancy(b, lo, hi, resolution)
    union = (occ_a | occ_b).sum()
    iou = float((occ_a & occ_b).sum() / union) if union else 0.0
    return iou, float(occ_a.sum() / occ_b.sum()) if occ_b.any() else float("nan")


def volume_iou(
    a: trimesh.Trimesh, b: trimesh.Trimesh, *, resolution: int = IOU_RESOLUTION, bounds: str = "union"
) -> float:
    """Volume IoU of two closed meshes on a ``resolution``^3 grid (see module docstring)."""
    return volume_overlap(a, b, resolution=resolution, bounds=bounds)[0]


def composite_on_white(rgb: Tensor, alpha: Tensor) -> Tensor:
    """(v, h, w, 3) colours and (v, h, w) alpha -> (v, h, w, 3) on a white background."""
    return on_white(rgb, alpha[..., None])


def psnr(pred: Tensor, target: Tensor) -> float:
    """Mean over views of the PSNR (dB, peak 1) between (v, h, w, 3) images in [0, 1]."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((-10 * torch.log10(mse)).mean())


def ssim(pred: Tensor, target: Tensor) -> float:
    """Mean SSIM (kornia, 11 px window) between (v, h, w, 3) images in [0, 1]."""
    import kornia.metrics

    p = rearrange(pred.float(), "v h w c -> v c h w")
    t = rearrange(target.float(), "v h w c -> v c h w")
    return float(kornia.metrics.ssim(p, t, window_size=11).mean())


def _alexnet_weights() -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    return path if path.is_file() else None


def lpips(pred: Tensor, target: Tensor) -> float | None:
    """LPIPS (AlexNet) between (v, h, w, 3) images, or None with a warning when the
    ``lpips`` package or its weights are not already installed (never downloads)."""
    if importlib.util.find_spec("lpips") is None or _alexnet_weights() is None:
        warnings.warn(
            "LPIPS skipped: needs `pip install lpips` and the torchvision AlexNet weights in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} (this code never downloads weights).",
            stacklevel=2,
        )
        return None
    import lpips as lpips_pkg

    net = lpips_pkg.LPIPS(net="alex", verbose=False)
    p = rearrange(pred.float(), "v h w c -> v c h w") * 2 - 1
    t = rearrange(target.float(), "v h w c -> v c h w") * 2 - 1
    with torch.no_grad():
        return float(net(p, t).mean())
