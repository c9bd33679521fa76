"""Colour a reconstructed surface from the 32 views: per-vertex colours and UV textures.

Every surface point takes the weighted mean of the view pixels it projects to, over the
views that see it. Visibility is a depth test against depth maps rendered from an
occluder mesh (the reconstruction itself, or a coarser proxy for very dense meshes);
weights ``mask * max(0, cos(normal, to_camera)) ** sharpness`` favour frontal views,
which keeps detail sharp and avoids smearing grazing pixels. Points no view sees (e.g.
the underside of a concavity) take the colour of the nearest coloured point.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from numpy.typing import NDArray
from torch import Tensor

from ..cameras import resized_intrinsics
from .render import project_to_screen, rasterize

_CHUNK = 65_536
_XATLAS_MAX_FACES = 20_000  # xatlas 0.0.11 is slow (~3 s at 20k faces) and can crash far above


@dataclass(frozen=True)
class ViewSet:
    """The images to colour from: views (v, h, w, 3), masks (v, h, w), cameras c2w (v, 4, 4), K (3, 3)."""

    views: Tensor
    masks: Tensor
    c2w: Tensor
    K: Tensor


def depth_maps(vertices: Tensor, faces: Tensor, vs: ViewSet, max_size: int = 128) -> tuple[Tensor, Tensor]:
    """Depth of the occluder mesh in every view, (v, s, s) (+inf off the surface), at most
    ``max_size`` px; returns it with the matching intrinsics."""
    h, w = vs.views.shape[1:3]
    scale = min(1.0, max_size / max(h, w))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    K = resized_intrinsics(vs.K, (w, h), (sw, sh))
    frags = rasterize(project_to_screen(vertices, vs.c2w, K), faces, sw, sh)
    return frags.depth, K


def project_colors(
    points: Tensor,
    normals: Tensor,
    vs: ViewSet,
    depth: Tensor,
    depth_K: Tensor,
    *,
    tolerance: float,
    sharpness: float = 4.0,
) -> tuple[Tensor, Tensor]:
    """Colours (p, 3) of surface points (p, 3) with unit normals (p, 3), and the total
    weight (p,) (0 = seen by no view).

    ``depth`` (v, dh, dw) are occluder depth maps for intrinsics ``depth_K``; a point is
    visible in a view when it is at most ``tolerance`` behind the depth map.
    """
    v, h, w, _ = vs.views.shape
    images = torch.cat((vs.views, vs.masks[..., None]), dim=-1)  # v h w 4
    images = rearrange(images, "v h w c -> v c h w")
    depth_img = depth.clamp(max=1e6)[:, None]  # v 1 dh dw
    centers = vs.c2w[:, :3, 3].float()  # v 3
    to_grid = torch.tensor([2 / w, 2 / h])  # same normalised frame at any resolution
    colors, weights = [], []
    for pts, nrm in zip(points.float().split(_CHUNK), normals.float().split(_CHUNK), strict=True):
        scr = project_to_screen(pts, vs.c2w, vs.K)  # v n 3
        grid = scr[..., :2] * to_grid - 1
        rgbm = F.grid_sample(images, grid[:, None], mode="bilinear", padding_mode="border", align_corners=False)
        rgbm = rgbm[:, :, 0]  # v 4 n
        occ = F.grid_sample(depth_img, grid[:, None], mode="nearest", padding_mode="border", align_corners=False)
        visible = (scr[..., 2] <= occ[:, 0, 0] + tolerance) & (grid.abs() <= 1).all(-1)  # v n
        # cos(normal, point -> camera) from dot products, without (v, n, 3) temporaries
        dist2 = (centers**2).sum(-1)[:, None] - 2 * centers @ pts.T + (pts**2).sum(-1)
        facing = centers @ nrm.T - (pts * nrm).sum(-1)  # v n
        cos = (facing * dist2.clamp(min=1e-12).rsqrt()).clamp(min=0)
        wgt = visible * rgbm[:, 3] * cos.pow(sharpness)  # v n
        total = wgt.sum(0)
        colors.append(torch.einsum("vn,vcn->nc", wgt, rgbm[:, :3]) / total.clamp(min=1e-8)[:, None])
        weights.append(total)
    return torch.cat(colors), torch.cat(weights)


def fill_unseen(points: NDArray[np.floating], colors: NDArray[np.floating], seen: NDArray[np.bool_]) -> NDArray:
    """Give points no view saw the colour of their nearest seen point (grey if none is)."""
    from scipy.spatial import cKDTree

    if seen.all():
        return colors
    out = colors.copy()
    if not seen.any():
        out[:] = 0.5
        return out
    _, nearest = cKDTree(points[seen]).query(points[~seen])
    out[~seen] = colors[seen][nearest]
    return out


@dataclass(frozen=True)
class Visibility:
    """Occluder depth maps (v, s, s) with their intrinsics, and how far behind them a point
    may lie and still count as seen."""

    depth: Tensor
    K: Tensor
    tolerance: float


def visibility(vertices: Tensor, faces: Tensor, vs: ViewSet, *, tolerance: float) -> Visibility:
    """Depth maps of the occluder mesh in every view, rendered once for all the points to colour;
    ``tolerance`` (world units) grows by ~2 depth-map pixels at the rig distance."""
    depth, depth_K = depth_maps(vertices, faces, vs)
    return Visibility(depth, depth_K, tolerance + 2.0 * 1.5 / float(depth_K[0, 0]))


def color_points(points: Tensor, normals: Tensor, vs: ViewSet, vis: Visibility) -> NDArray[np.float32]:
    """Colours (p, 3) float32 of surface points, with unseen points filled from neighbours."""
    colors, weight = project_colors(points, normals, vs, vis.depth, vis.K, tolerance=vis.tolerance)
    return fill_unseen(points.numpy(), colors.numpy(), (weight > 1e-6).numpy()).astype(np.float32)


def uv_atlas(
    vertices: NDArray[np.float32], faces: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """xatlas UV unwrap: returns (vertex map (m,), new faces (f, 3), uv (m, 2) in [0, 1]).

    Runs in a thread with a large stack: xatlas recurses deeply on big meshes.
    """
    if len(faces) > _XATLAS_MAX_FACES:
        raise ValueError(
            f"UV unwrapping {len(faces)} faces; xatlas is limited to {_XATLAS_MAX_FACES} here "
            "(slow and unstable above). Pass max_faces <= 20000 or texture_size=0 for vertex colours."
        )
    import xatlas

    result: list[tuple[NDArray, NDArray, NDArray]] = []

    def work() -> None:
        result.append(xatlas.parametrize(vertices.astype(np.float32), faces.astype(np.uint32)))

    old = threading.stack_size(256 * 1024 * 1024)
    try:
        thread = threading.Thread(target=work, name="xatlas")
        thread.start()
        thread.join()
    finally:
        threading.stack_size(old)
    vmap, new_faces, uv = result[0]
    return vmap.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float32)


def bake_texture(
    vertices: Tensor,
    faces: Tensor,
    normals: Tensor,
    uv: Tensor,
    size: int,
    color_fn: Callable[[Tensor, Tensor], NDArray[np.float32]],
    *,
    sample_size: int | None = None,
) -> NDArray[np.float32]:
    """Texture image (size, size, 3) float32: each texel covered by a UV triangle gets the
    colour of its 3D point (``color_fn(points, normals)``); empty texels are filled from the
    nearest covered texel so bilinear lookups near seams do not bleed background.

    ``sample_size`` < ``size`` looks colours up on that coarser texel grid and upsamples the
    filled image (bilinear): texels much finer than the views' pixels add no information,
    and the lookup's cost grows with the texel count (1024^2: ~1.5 s on 2 CPU cores).
    """
    from scipy import ndimage

    n = min(size, sample_size or size)
    screen = torch.stack((uv[:, 0] * n, (1 - uv[:, 1]) * n, torch.ones(len(uv))), dim=-1)  # row 0 = v 1
    frags = rasterize(screen[None], faces, n, n)
    hit = frags.face_id[0] >= 0  # n n
    fid, bary = frags.face_id[0][hit], frags.bary[0][hit]  # t, t 3
    pts = torch.einsum("tc,tck->tk", bary, vertices.float()[faces[fid]])
    nrm = F.normalize(torch.einsum("tc,tck->tk", bary, normals.float()[faces[fid]]), dim=-1)
    image = np.zeros((n, n, 3), np.float32)
    image[hit.numpy()] = color_fn(pts, nrm)
    if hit.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~hit.numpy(), return_indices=True)
        image = image[iy, ix]
    if n < size:
        chw = torch.from_numpy(image).permute(2, 0, 1)[None]
        up = F.interpolate(chw, size=(size, size), mode="bilinear", align_corners=False)
        image = up[0].permute(1, 2, 0).contiguous().numpy()
    return image
