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
    x, y, z = screen.unbind(-1)  # each t 3
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    area = torch.where(area.abs() > 1e-12, area, torch.full_like(area, float("nan")))

    def edge(i: int, j: int) -> Tensor:  # signed area of (p, corner i, corner j) / area
        a = (y[:, i] - y[:, j]) / area
        b = (x[:, j] - x[:, i]) / area
        c = (x[:, i] * y[:, j] - x[:, j] * y[:, i]) / area
        return torch.stack((a, b, c), dim=-1)  # t 3

    w0, w1 = edge(1, 2), edge(2, 0)
    w2 = -w0 - w1
    w2[:, 2] += 1.0
    inv_z = w0 / z[:, :1] + w1 / z[:, 1:2] + w2 / z[:, 2:3]
    return torch.stack((w0, w1, inv_z), dim=1)


def _pixel_boxes(screen: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer pixel bounding boxes (x0, y0, sx, sy) of the pixel centres each triangle may cover."""
    lo, hi = screen[..., :2].amin(1), screen[..., :2].amax(1)  # t 2
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(min=0).long()
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(min=0).long()
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(max=width - 1).long()
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(max=height - 1).long()
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def iter_coverage(screen: Tensor, width: int, height: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Yield every (triangle, pixel) pair whose pixel centre lies inside the triangle.

    ``screen`` (t, 3, 3) holds triangle corners (x, y, z) in pixels and depth (z > 0).
    Yields chunks (tri (c,), px (c,), py (c,), inv_z (c,)), no z-test. Used by the
    z-buffered :func:`rasterize` and by the ray-parity volume occupancy of the metrics.
    """
    coef = edge_coefficients(screen)
    x0, y0, sx, sy = _pixel_boxes(screen, width, height)
    ok = (sx > 0) & (sy > 0) & torch.isfinite(coef).all(-1).all(-1) & (screen[..., 2] > _NEAR).all(-1)
    gx = torch.ceil(torch.log2(sx.clamp(min=1).float())).long()
    gy = torch.ceil(torch.log2(sy.clamp(min=1).float())).long()
    group = torch.where(ok, gx * 64 + gy, -1)
    for key in torch.unique(group).tolist():
        if key < 0:
            continue
        tris = torch.nonzero(group == key).squeeze(1)
        bx, by = 2 ** (key // 64), 2 ** (key % 64)
        step = max(1, _CANDIDATE_BUDGET // (bx * by))
        for chunk in tris.split(step):
            yield _cover_group(chunk, coef[chunk], x0[chunk], y0[chunk], sx[chunk], sy[chunk], bx, by)


def _cover_group(
    tris: Tensor, coef: Tensor, x0: Tensor, y0: Tensor, sx: Tensor, sy: Tensor, bx: int, by: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense (triangle, by, bx) evaluation of the edge functions of one size group."""
    ox = torch.arange(bx)
    oy = torch.arange(by)
    px = x0[:, None, None] + ox[None, None, :]  # t 1 bx
    py = y0[:, None, None] + oy[None, :, None]  # t by 1
    fx, fy = px.float() + 0.5, py.float() + 0.5
    val = coef[:, :, None, None, 0] * fx[:, None] + coef[:, :, None, None, 1] * fy[:, None]
    val = val + coef[:, :, None, None, 2]  # t 3 by bx: w0, w1, inv_z
    w0, w1, inv_z = val.unbind(1)
    inside = (w0 >= 0) & (w1 >= 0) & (w0 + w1 <= 1) & (inv_z > 0)
    inside &= (ox[None, None, :] < sx[:, None, None]) & (oy[None, :, None] < sy[:, None, None])
    t, iy, ix = torch.nonzero(inside, as_tuple=True)
    return tris[t], px[t, 0, ix], py[t, iy, 0], inv_z[t, iy, ix]


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
    tri = rearrange(screen[:, faces], "v f c k -> (v f) c k")  # (v f) 3 3
    zs = tri[..., 2][tri[..., 2] > _NEAR]
    z_lo, z_hi = (zs.min().item(), zs.max().item()) if zs.numel() else (0.0, 1.0)
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
    bary = torch.zeros(v, h, w, 3)
    depth = torch.full((v, h, w), float("inf"))
    vi, yi, xi = torch.nonzero(face_id >= 0, as_tuple=True)
    if len(vi):
        screen = tri[vi * f + face_id[vi, yi, xi]]  # p 3 3
        coef = edge_coefficients(screen)
        pix = torch.stack((xi.float() + 0.5, yi.float() + 0.5, torch.ones(len(xi))), dim=-1)  # p 3
        w0, w1, inv_z = torch.einsum("prk,pk->rp", coef, pix)
        lin = torch.stack((w0, w1, 1 - w0 - w1), dim=-1)  # p 3, screen-space weights
        persp = lin / screen[..., 2]
        persp = persp / persp.sum(-1, keepdim=True)
        bary[vi, yi, xi] = persp
        depth[vi, yi, xi] = 1.0 / inv_z
    return Fragments(face_id=face_id, bary=bary, depth=depth)


def project_to_screen(vertices: Tensor, c2w: Tensor, K: Tensor) -> Tensor:
    """World vertices (n, 3) to (v, n, 3) screen coordinates (x px, y px, depth).

    Same maths as :func:`mvdpp_core.cameras.project` (OpenCV c2w, pixel = K x / z).
    """
    w2c = torch.linalg.inv(c2w.double()).float()  # einsum: ~8x faster than kornia here
    cam = torch.einsum("vij,nj->vni", w2c[:, :3, :3], vertices.float()) + w2c[:, None, :3, 3]  # v n 3
    z = cam[..., 2:3]
    xy = cam[..., :2] / z.clamp(min=_NEAR) @ K[:2, :2].float().T + K[:2, 2].float()
    return torch.cat((xy, z), dim=-1)


def _shade_colors(
    frags: Fragments, faces: Tensor, colors: Tensor | UVTexture | None, n_vertices: int
) -> Tensor:
    """Per-pixel albedo (v, h, w, 3) from vertex colours or a UV texture."""
    v, h, w = frags.face_id.shape
    out = torch.ones(v, h, w, 3)
    hit = frags.face_id >= 0
    fid, bary = frags.face_id[hit], frags.bary[hit]  # p, p 3
    if colors is None:
        out[hit] = 0.8
    elif isinstance(colors, UVTexture):
        uv = colors.uv.float()
        corner_uv = uv[faces[fid]] if uv.shape[0] == n_vertices and uv.ndim == 2 else uv[fid]  # p 3 2
        uv_p = torch.einsum("pc,pck->pk", bary, corner_uv)
        grid = torch.stack((uv_p[:, 0] * 2 - 1, 1 - uv_p[:, 1] * 2), dim=-1)  # v up -> row 0 at top
        img = rearrange(colors.image.float(), "h w c -> 1 c h w")
        sampled = F.grid_sample(img, grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
        out[hit] = rearrange(sampled, "1 c 1 p -> p c")
    else:
        out[hit] = torch.einsum("pc,pck->pk", bary, colors.float()[faces[fid]])
    return out


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
    hit = frags.face_id >= 0
    albedo = _shade_colors(frags, faces, colors, len(vertices))
    normals = torch.zeros_like(albedo)
    if len(faces):
        n_face = _face_normals(vertices, faces)[frags.face_id.clamp(min=0)]  # v h w 3
        to_cam = c2w[:, None, None, :3, 2].float()  # camera forward; flip normals facing away
        n_face = torch.where((n_face * to_cam).sum(-1, keepdim=True) > 0, -n_face, n_face)
        normals = torch.where(hit[..., None], n_face, normals)
    if light_dir is not None:
        lam = (normals * F.normalize(light_dir.float(), dim=0)).sum(-1).abs()
        albedo = albedo * (ambient + (1 - ambient) * lam)[..., None]
    alpha = hit.float()
    rgb = albedo * alpha[..., None] + background * (1 - alpha[..., None])
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
