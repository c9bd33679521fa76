"""``reconstruct``: 32 rig views + masks -> a coloured (optionally UV-textured) mesh."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import trimesh
from torch import Tensor

from ..cameras import intrinsics, rig_c2w
from ..common import parse_enum
from .carving import Grid, carve, keep_largest, occupancy_to_sdf
from .mesh import Method, ReconstructedMesh
from .meshing import mesh_field, reduce_mesh, resample_field, vertex_normals
from .photo import photo_carve
from .sdf import SDFConfig, carve_with_sdf, fit_sdf
from .silhouettes import snap_masks_to_color
from .texturing import ViewSet, bake_texture, color_points, uv_atlas, visibility
from .validation import check_resolution, normalize_masks, normalize_views

ProgressFn = Callable[[int, int], None]
DEFAULT_TEXTURED_FACES = 10_000
_OCCLUDER_MAX_FACES = 20_000  # denser meshes use a coarser proxy for the visibility depth maps


class _Progress:
    """Maps sub-step progress onto one (step, total) stream for the caller's callback."""

    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)

    def sub(self, base: int) -> ProgressFn:
        def report(step: int, _total: int) -> None:
            if self.callback is not None:
                self.callback(min(base + step, self.total), self.total)

        return report


def reconstruct(
    views: Tensor,
    masks: Tensor,
    *,
    method: Method | str = Method.FAST,
    resolution: int = 128,
    texture_size: int = 0,
    max_faces: int | None = None,
    outlier_views: int | None = None,
    snap_masks: bool = True,
    smooth_iterations: int = 3,
    sdf_config: SDFConfig | None = None,
    callback: ProgressFn | None = None,
) -> ReconstructedMesh:
    """Reconstruct a mesh from the 32 rig views and their foreground masks.

    Args:
        views: (32, H, W, 3) or (32, 3, H, W) float in [0, 1], rig order ``i = e * 8 + a``
            (``mvdpp_core.cameras``); the background may be anything, masks decide.
        masks: (32, H, W) float in [0, 1], 1 = object.
        method: ``"fast"`` (robust visual-hull carving, seconds) or ``"quality"`` (carving,
            then photo-consistency carving of the hull, which opens concavities the
            silhouettes close over (a cup, a bowl, the roof over a flat top), and an
            optional NeuS-style SDF fit from it; ``sdf_config``, CUDA when available).
        resolution: carving grid cells per axis over [-0.6, 0.6]^3 (128: ~9 mm cells).
        texture_size: 0 for per-vertex colours only; N > 0 also bakes an N x N UV texture
            (xatlas) on a mesh reduced to ``max_faces`` (default 10k) faces.
        max_faces: reduce the mesh to at most this many faces (None: keep it dense).
        outlier_views: None (default) finds and ignores the views whose masks contradict
            the others, however many (up to a quarter of the views); N caps it at N; 0
            trusts every mask (with ``snap_masks=False``: the plain hard visual hull).
        snap_masks: move each mask's outline (by at most ~3 px at 256 px) to the colour edge
            between object and a plain backdrop, which undoes masks a few pixels too large
            or small; views whose backdrop is not plain are left as they are.
        smooth_iterations: Taubin smoothing passes after marching cubes.
        callback: ``callback(step, total)`` after each step; raise inside it to cancel.
    Returns:
        :class:`ReconstructedMesh` in the +Z-up world frame of the rig.
    """
    method = parse_enum(Method, method, "method")
    views = normalize_views(views)
    masks = normalize_masks(masks, views)
    resolution = check_resolution(resolution)
    if isinstance(texture_size, bool) or not isinstance(texture_size, (int, np.integer)):
        raise TypeError(f"texture_size={texture_size!r}; pass a whole number: 0 (vertex colours) or e.g. 1024.")
    if texture_size < 0:
        raise ValueError(f"texture_size={texture_size}; use 0 (vertex colours) or a positive size like 1024.")
    if texture_size and max_faces is None:
        max_faces = DEFAULT_TEXTURED_FACES
    config = sdf_config or SDFConfig()
    sdf_steps = config.photo_rounds + config.iterations if method is Method.QUALITY else 0
    progress = _Progress(callback, 4 + sdf_steps)

    h, w = views.shape[1:3]
    c2w, K = rig_c2w(), intrinsics(w, h)
    if snap_masks:
        masks, _ = snap_masks_to_color(views, masks)
    carved = carve(masks, c2w, K, resolution=resolution, outlier_views=outlier_views)
    field, fgrid = keep_largest(carved.occupancy), carved.grid
    keep = [i for i in range(len(views)) if i not in carved.dropped_views]  # views with trusted masks
    views, masks, c2w = views[keep], masks[keep], c2w[keep]
    progress.advance()
    level, high = 0.5, True  # occupancy: inside is high
    if method is Method.QUALITY:
        field, fgrid, level = _quality_field(views, masks, c2w, K, field, fgrid, config, progress)
    mesh = mesh_field(
        field, fgrid, level=level, inside_is_high=high, smooth_iterations=smooth_iterations, max_faces=max_faces
    )
    progress.advance()
    vs = ViewSet(views, masks, c2w, K)
    occluder = mesh
    if len(mesh.faces) > _OCCLUDER_MAX_FACES:
        occluder = reduce_mesh(mesh, _OCCLUDER_MAX_FACES, field, fgrid, level=level, inside_is_high=high)
    occ = (torch.from_numpy(np.asarray(occluder.vertices, np.float32)), torch.from_numpy(np.asarray(occluder.faces)))
    vis = visibility(*occ, vs, tolerance=2.0 * fgrid.spacing)

    def color_fn(points: Tensor, normals: Tensor) -> np.ndarray:
        return color_points(points, normals, vs, vis)

    verts = np.asarray(mesh.vertices, np.float32)
    normals = vertex_normals(verts, mesh.faces)
    colors = color_fn(torch.from_numpy(verts), torch.from_numpy(normals))
    progress.advance()
    dropped = tuple(carved.dropped_views)
    result = ReconstructedMesh(verts, np.asarray(mesh.faces, np.int64), colors, dropped_views=dropped)
    if texture_size:
        result = _add_texture(result, normals, texture_size, color_fn, sample_size=2 * max(h, w))
    progress.advance()
    return result


def _quality_field(
    views: Tensor,
    masks: Tensor,
    c2w: Tensor,
    K: Tensor,
    field: np.ndarray,
    grid: Grid,
    config: SDFConfig,
    progress: _Progress,
) -> tuple[np.ndarray, Grid, float]:
    """Photo-consistency carving of the hull ``field``, then the optional SDF fit; returns the
    field to mesh, its grid and level (inside is high)."""
    base = progress.done
    carved, cgrid = photo_carve(
        ViewSet(views, masks, c2w, K), field, grid, cells=config.photo_cells or min(96, grid.resolution - 1),
        threshold=config.photo_threshold,
        max_rounds=config.photo_rounds, callback=progress.sub(base),
    )
    progress.done = base + config.photo_rounds
    if config.iterations > 0:
        init = carved.astype(np.float32)
        sdf, sgrid = fit_sdf(views, masks, c2w, K, init, cgrid, config, progress.sub(progress.done))
    else:
        sdf, sgrid = occupancy_to_sdf(carved, cgrid.spacing), cgrid
    progress.done += config.iterations
    if not config.carve_only:
        return -sdf, sgrid, 0.0  # negate: inside-high like occupancy
    hull, _ = resample_field(field, grid, cgrid.resolution - 1)
    return carve_with_sdf(field, grid, sdf, sgrid, (hull > 0.5) & ~carved), grid, 0.5


def _add_texture(
    mesh: ReconstructedMesh,
    normals: np.ndarray,
    size: int,
    color_fn: Callable[[Tensor, Tensor], np.ndarray],
    *,
    sample_size: int,
) -> ReconstructedMesh:
    """UV-unwrap with xatlas (splitting vertices on seams) and bake a texture from the views,
    looking colours up on at most a ``sample_size`` texel grid (twice the views' size)."""
    vmap, faces, uv = uv_atlas(mesh.vertices, mesh.faces)
    verts, nrm = mesh.vertices[vmap], normals[vmap]
    image = bake_texture(
        torch.from_numpy(verts), torch.from_numpy(faces), torch.from_numpy(nrm), torch.from_numpy(uv), size, color_fn,
        sample_size=sample_size,
    )
    return ReconstructedMesh(verts, faces, mesh.vertex_colors[vmap], uv, image, mesh.dropped_views)


def mesh_from_trimesh(mesh: trimesh.Trimesh) -> ReconstructedMesh:
    """Wrap a vertex-coloured (or uncoloured: grey) trimesh as a :class:`ReconstructedMesh`."""
    verts = np.asarray(mesh.vertices, np.float32)
    visual = mesh.visual.to_color() if isinstance(mesh.visual, trimesh.visual.TextureVisuals) else mesh.visual
    colors = np.asarray(visual.vertex_colors)[:, :3] / 255.0
    return ReconstructedMesh(verts, np.asarray(mesh.faces, np.int64), colors.astype(np.float32))


__all__ = ["reconstruct", "mesh_from_trimesh", "Grid", "DEFAULT_TEXTURED_FACES"]
