"""A vectorised pure-PyTorch triangle rasteriser with a z-buffer.

Why our own: the renderer must run on any CPU without OpenGL or a compiled extension
(tests, texture baking, synthetic training data, evaluation). It is exact (no soft
rasterisation, one sample per pixel centre; ``antialias`` supersamples) and fast
enough for 32 views of a ~20k-face mesh at 128 px in well under a second or two.

How: every triangle's edge functions and inverse depth are affine in the pixel
position, so we precompute their coefficients per (view, face), enumerate the pixels of
each face's bounding box in groups of faces with the same power-of-two box size (so a
group is one dense broadcast), and resolve visibility with one ``scatter_reduce(amin)``
over an int64 key that packs (quantised depth, face id). Pixel centres are at
integer + 0.5, as in :mod:`mvdpp_core.cameras`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

if TYPE_CHECKING:
    import trimesh

_FACE_BITS = 26  # faces per mesh < 2**26 (67M)
_DEPTH_LEVELS = 2**36
_CANDIDATE_BUDGET = 2_000_000  # (face, pixel) pairs evaluated per broadcast
_NEAR = 1e-4


@dataclass(frozen=True)
class UVTexture:
    """A UV-mapped texture: ``uv`` per vertex (n, 2) or per face corner (f, 3, 2), in
    [0, 1] with v up (OBJ / trimesh convention, row 0 of ``image`` is v = 1);
    ``image`` (th, tw, 3) float in [0, 1]."""

    uv: Tensor
    image: Tensor


@dataclass(frozen=True)
class Fragments:
    """Per-pixel rasterisation result for v views of h x w pixels.

    face_id (v, h, w) int64, -1 where no face; bary (v, h, w, 3) perspective-correct
    barycentric weights of the face's corners; depth (v, h, w) along the optical axis,
    +inf where no face.
    """

    face_id: Tensor
    bary: Tensor
    depth: Tensor


@dataclass(frozen=True)
class RenderResult:
    """Rendered views: rgb (v, h, w, 3) composited on ``background``, alpha (v, h, w)
    in [0, 1], depth (v, h, w) (+inf on background), face_id (v, h, w) int64 (-1 on
    background), normal (v, h, w, 3) world-space face normals facing the camera."""

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    face_id: Tensor
    normal: Tensor


def edge_coefficients(screen: Tensor) -> Tensor:
    """Affine coefficients of (w0, w1, 1/z) over the pixel plane for each triangle.

    ``screen`` (t, 3, 3): corners (x, y, z) in pixels and depth. Returns (t, 3, 3) with
    rows (w0, w1, inv_z) and columns (a, b, c) such that value = a * px + b * py + c;
    w2 = 1 - w0 - w1. Degenerate (zero-area) triangles get NaN coefficients.
    """
    return _edge_rows(*screen.permute(2, 1, 0).contiguous())


def _edge_rows(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """:func:`edge_coefficients` from the corners' x, y and z, each (3, t) (one contiguous row per corner)."""
    area = (x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])
    area = torch.where(area.abs() > 1e-12, area, torch.full_like(area, float("nan")))

    def edge(i: int, j: int) -> tuple[Tensor, Tensor, Tensor]:  # signed area of (p, corner i, corner j) / area
        return (y[i] - y[j]) / area, (x[j] - x[i]) / area, (x[i] * y[j] - x[j] * y[i]) / area

    w0, w1 = edge(1, 2), edge(2, 0)
    w2 = [-p - q for p, q in zip(w0, w1, strict=True)]
    w2[2] = w2[2] + 1.0
    inv_z = [p / z[0] + q / z[1] + r / z[2] for p, q, r in zip(w0, w1, w2, strict=True)]
    return torch.stack((*w0, *w1, *inv_z), dim=-1).view(-1, 3, 3)


def _pixel_boxes(x: Tensor, y: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer pixel bounding boxes (x0, y0, sx, sy) of the pixel centres each triangle may
    cover, from its corners' x and y, each (3, t)."""
    lo_x, lo_y, hi_x, hi_y = x.amin(0), y.amin(0), x.amax(0), y.amax(0)
    x0 = torch.ceil(lo_x - 0.5).clamp(min=0).long()
    y0 = torch.ceil(lo_y - 0.5).clamp(min=0).long()
    x1 = torch.floor(hi_x - 0.5).clamp(max=width - 1).long()
    y1 = torch.floor(hi_y - 0.5).clamp(max=height - 1).long()
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def iter_coverage(screen: Tensor, width: int, height: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Yield every (triangle, pixel) pair whose pixel centre lies inside the triangle.

    ``screen`` (t, 3, 3) holds triangle corners (x, y, z) in pixels and depth (z > 0).
    Yields chunks (tri (c,), px (c,), py (c,), inv_z (c,)), no z-test. Used by the
    z-buffered :func:`rasterize` and by the ray-parity volume occupancy of the metrics.
    """
    corners = screen.permute(2, 1, 0).contiguous()  # x y z, corner, triangle
    x0, y0, sx, sy = _pixel_boxes(corners[0], corners[1], width, height)
    # Small triangles often hold no pixel centre (a fifth of a procedural object's): drop them (and those
    # behind the camera) before anything else is computed for them.
    keep = torch.nonzero((sx > 0) & (sy > 0) & (corners[2] > _NEAR).all(0)).squeeze(1)
    coef = _edge_rows(*corners.index_select(2, keep))
    good = torch.nonzero(coef.flatten(1).abs().amax(1) < float("inf")).squeeze(1)  # zero area: NaN
    keep = keep.index_select(0, good)
    sx, sy = sx.index_select(0, keep), sy.index_select(0, keep)
    gx = torch.ceil(torch.log2(sx.float())).long()
    gy = torch.ceil(torch.log2(sy.float())).long()
    # One stable sort by box size class instead of a scan per class: each class's triangles
    # keep their order and become one contiguous slice.
    group, order = torch.sort(gx * 64 + gy, stable=True)
    tris = keep.index_select(0, order)
    coef = coef.index_select(0, good.index_select(0, order))
    x0, y0 = x0.index_select(0, tris), y0.index_select(0, tris)
    sx, sy = sx.index_select(0, order), sy.index_select(0, order)
    keys, counts = torch.unique_consecutive(group, return_counts=True)
    start = 0
    for key, n in zip(keys.tolist(), counts.tolist(), strict=True):
        bx, by = 2 ** (key // 64), 2 ** (key % 64)
        step = max(1, _CANDIDATE_BUDGET // (bx * by))
        for a in range(start, start + n, step):
            b = min(a + step, start + n)
            yield _cover_group(tris[a:b], coef[a:b], x0[a:b], y0[a:b], sx[a:b], sy[a:b], bx, by)
        start += n


def _cover_group(
    tris: Tensor, coef: Tensor, x0: Tensor, y0: Tensor, sx: Tensor, sy: Tensor, bx: int, by: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense (triangle, by, bx) evaluation of the edge functions of one size group."""
    ox = torch.arange(bx)
    oy = torch.arange(by)
    fx = ((x0[:, None] + ox).float() + 0.5)[:, None, :]  # t 1 bx
    fy = ((y0[:, None] + oy).float() + 0.5)[:, :, None]  # t by 1

    def plane(row: int) -> Tensor:  # t by bx: value of coefficient row (w0, w1, inv_z)
        a, b, c = coef[:, row, :, None, None].unbind(1)
        return a * fx + b * fy + c

    w0, w1, inv_z = plane(0), plane(1), plane(2)
    inside = (w0 >= 0) & (w1 >= 0) & (w0 + w1 <= 1) & (inv_z > 0)
    if bx > 1:
        inside &= ox < sx[:, None, None]
    if by > 1:
        inside &= oy[:, None] < sy[:, None, None]
    flat = torch.nonzero(inside.view(-1)).squeeze(1)
    t, iy, ix = flat // (by * bx), flat // bx % by, flat % bx
    px, py = x0.index_select(0, t) + ix, y0.index_select(0, t) + iy
    return tris.index_select(0, t), px, py, inv_z.view(-1).index_select(0, flat)


def rasterize(screen: Tensor, faces: Tensor, width: int, height: int) -> Fragments:
    """Z-buffered rasterisation of one mesh seen by v cameras.

    ``screen`` (v, n, 3): vertices as (x pixel, y pixel, depth) per view; ``faces`` (f, 3).
    Faces with a corner at depth <= 1e-4 (behind or at the camera) are dropped; meshes
    seen by the rig never have any. Returns :class:`Fragments`.
    """
    v, f = screen.shape[0], faces.shape[0]
    if f >= 2**_FACE_BITS:
        raise ValueError(f"mesh has {f} faces; the rasteriser supports < {2**_FACE_BITS}. Decimate it.")
    screen = screen.float()
    tri = screen.index_select(1, faces.flatten()).view(v * f, 3, 3)  # (v f) 3 3
    z = tri[..., 2]
    near = z > _NEAR
    z_lo, z_hi = 0.0, 1.0
    if bool(near.any()):
        z_lo = torch.where(near, z, float("inf")).min().item()
        z_hi = torch.where(near, z, float("-inf")).max().item()
    scale = (_DEPTH_LEVELS - 1) / max(z_hi - z_lo, 1e-9)
    empty = torch.iinfo(torch.int64).max
    zbuf = torch.full((v * height * width,), empty, dtype=torch.int64)
    for tri_id, px, py, inv_z in iter_coverage(tri, width, height):
        depth = 1.0 / inv_z.double()
        quant = ((depth - z_lo) * scale).clamp(0, _DEPTH_LEVELS - 1).long()
        view = tri_id // f
        key = (quant << _FACE_BITS) | (tri_id % f)
        zbuf.scatter_reduce_(0, view * height * width + py * width + px, key, reduce="amin")
    hit = zbuf != empty
    face_id = torch.where(hit, zbuf & (2**_FACE_BITS - 1), -1)
    return _fragments(rearrange(face_id, "(v h w) -> v h w", v=v, h=height), tri, f, width)


def _fragments(face_id: Tensor, tri: Tensor, f: int, width: int) -> Fragments:
    """Recompute exact barycentrics and depth for the winning face of each pixel."""
    v, h, w = face_id.shape
    bary = torch.zeros(v * h * w, 3)
    depth = torch.full((v * h * w,), float("inf"))
    pixel = torch.nonzero(face_id.view(-1) >= 0).squeeze(1)  # flat indices of covered pixels
    if len(pixel):
        vi, yi, xi = pixel // (h * w), pixel // w % h, pixel % w
        screen = tri.index_select(0, vi * f + face_id.view(-1).index_select(0, pixel))  # p 3 3
        coef = edge_coefficients(screen)
        pix = torch.stack((xi.float() + 0.5, yi.float() + 0.5, torch.ones(len(xi))), dim=-1)  # p 3
        w0, w1, inv_z = torch.einsum("prk,pk->rp", coef, pix)
        lin = torch.stack((w0, w1, 1 - w0 - w1), dim=-1)  # p 3, screen-space weights
        persp = lin / screen[..., 2]
        persp = persp / persp.sum(-1, keepdim=True)
        bary.index_copy_(0, pixel, persp)
        depth.index_copy_(0, pixel, 1.0 / inv_z)
    return Fragments(face_id=face_id, bary=bary.view(v, h, w, 3), depth=depth.view(v, h, w))


def project_to_screen(vertices: Tensor, c2w: Tensor, K: Tensor) -> Tensor:
    """World vertices (n, 3) to (v, n, 3) screen coordinates (x px, y px, depth).

    Same maths as :func:`mvdpp_core.cameras.project` (OpenCV c2w, pixel = K x / z).
    """
    w2c = torch.linalg.inv(c2w.double()).float()  # einsum: ~8x faster than kornia here
    cam = torch.einsum("vij,nj->vni", w2c[:, :3, :3], vertices.float()) + w2c[:, None, :3, 3]  # v n 3
    z = cam[..., 2:3]
    xy = cam[..., :2] / z.clamp(min=_NEAR) @ K[:2, :2].float().T + K[:2, 2].float()
    return torch.cat((xy, z), dim=-1)


def _albedo(bary: Tensor, fid: Tensor, faces: Tensor, colors: Tensor | UVTexture | None, n_vertices: int) -> Tensor:
    """Albedo (p, 3) of p covered samples (barycentrics (p, 3) in faces ``fid`` (p,)) from
    vertex colours, a UV texture, or grey."""
    if colors is None:
        return torch.full((len(fid), 3), 0.8)
    if isinstance(colors, UVTexture):
        uv = colors.uv.float()
        corner_uv = uv[faces[fid]] if uv.shape[0] == n_vertices and uv.ndim == 2 else uv[fid]  # p 3 2
        uv_p = torch.einsum("pc,pck->pk", bary, corner_uv)
        grid = torch.stack((uv_p[:, 0] * 2 - 1, 1 - uv_p[:, 1] * 2), dim=-1)  # v up -> row 0 at top
        img = rearrange(colors.image.float(), "h w c -> 1 c h w")
        sampled = F.grid_sample(img, grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
        return rearrange(sampled, "1 c 1 p -> p c")
    corner_colors = colors.float().index_select(0, faces.index_select(0, fid).view(-1))
    return torch.einsum("pc,pck->pk", bary, corner_colors.view(len(fid), 3, colors.shape[-1]))


def _face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    tri = vertices.float()[faces]  # f 3 3
    return F.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)


def render_mesh(
    vertices: Tensor,
    faces: Tensor,
    colors: Tensor | UVTexture | None,
    c2w: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    background: float = 1.0,
    light_dir: Tensor | None = None,
    ambient: float = 0.35,
    antialias: int = 1,
) -> RenderResult:
    """Render a triangle mesh at v OpenCV cameras (see :mod:`mvdpp_core.cameras`).

    Args:
        vertices: (n, 3) world positions. faces: (f, 3) int vertex indices.
        colors: per-vertex RGB (n, 3) in [0, 1], a :class:`UVTexture`, or None (grey).
        c2w: (v, 4, 4) camera-to-world; K: (3, 3) intrinsics for ``width`` x ``height``.
        background: grey level composited behind the object (1.0 = white, as the model's
            views); ``alpha`` is returned separately for other composites.
        light_dir: optional world direction *towards* the light; colours are then shaded
            ``albedo * (ambient + (1 - ambient) * |n . l|)`` (two-sided Lambert). None
            renders unlit albedo, which is what reconstruction tests compare against.
        antialias: supersampling factor s; rgb and alpha are box-filtered from s*s samples,
            depth, face_id and normal come from one sample per pixel.
    Returns:
        :class:`RenderResult` with float32 CPU tensors.
    """
    faces = torch.as_tensor(faces).long().cpu()
    vertices = torch.as_tensor(vertices).float().cpu()
    s = int(antialias)
    if s < 1:
        raise ValueError(f"antialias={antialias}; use an integer >= 1 (1 = no supersampling).")
    K_s = K.clone().double()
    K_s[:2] *= s
    screen = project_to_screen(vertices, c2w.cpu(), K_s)
    frags = rasterize(screen, faces, width * s, height * s)
    # Shade the covered samples only (a small object covers a few per cent of the frame).
    v, h, w = frags.face_id.shape
    hit = frags.face_id >= 0
    pixel = torch.nonzero(hit.view(-1)).squeeze(1)  # flat indices of covered samples
    fid = frags.face_id.view(-1).index_select(0, pixel)
    albedo = _albedo(frags.bary.view(-1, 3).index_select(0, pixel), fid, faces, colors, len(vertices))  # p 3
    normals = torch.zeros(v * h * w, 3)
    if len(fid):
        n_face = _face_normals(vertices, faces).index_select(0, fid)  # p 3
        forward = c2w.cpu()[:, :3, 2].float()  # camera forward; flip normals facing away
        to_cam = forward.index_select(0, pixel // (h * w))
        n_face = torch.where((n_face * to_cam).sum(-1, keepdim=True) > 0, -n_face, n_face)
        normals.index_copy_(0, pixel, n_face)
        if light_dir is not None:
            lam = (n_face * F.normalize(light_dir.float(), dim=0)).sum(-1).abs()
            albedo = albedo * (ambient + (1 - ambient) * lam)[..., None]
    alpha = hit.float()
    rgb = torch.full((v * h * w, 3), float(background)).index_copy_(0, pixel, albedo).view(v, h, w, 3)
    normals = normals.view(v, h, w, 3)
    if s > 1:
        rgb = rearrange(F.avg_pool2d(rearrange(rgb, "v h w c -> v c h w"), s), "v c h w -> v h w c")
        alpha = F.avg_pool2d(alpha[:, None], s)[:, 0]
        pick = (slice(None), slice(s // 2, None, s), slice(s // 2, None, s))
        return RenderResult(rgb, alpha, frags.depth[pick], frags.face_id[pick], normals[pick])
    return RenderResult(rgb, alpha, frags.depth, frags.face_id, normals)


def render_trimesh(mesh: trimesh.Trimesh, c2w: Tensor, K: Tensor, size: int, **kwargs: Any) -> RenderResult:
    """Render a vertex-coloured trimesh at v cameras into ``size`` x ``size`` images;
    keyword arguments as :func:`render_mesh` (the test shapes and procedural objects)."""
    colors = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    return render_mesh(
        torch.from_numpy(np.asarray(mesh.vertices)).float(),
        torch.from_numpy(np.asarray(mesh.faces)),
        torch.from_numpy(colors).float(),
        c2w, K, size, size, **kwargs,
    )
