"""Procedural analytic meshes, normalised per DESIGN section 3, with vertex colours.

Shared by the reconstruction tests and the synthetic training data: each builder returns
a watertight ``trimesh.Trimesh`` centred on its bounding-box centre and scaled so the
longest bounding-box side is 1 (it fits in [-0.5, 0.5]^3), +Z up, outward normals, and
vertex colours. Flat primitives are subdivided (``max_edge``) so per-vertex colour
patterns and the rasteriser's per-vertex interpolation have enough resolution.
"""

from __future__ import annotations

import numpy as np
import trimesh
from numpy.typing import NDArray

DEFAULT_MAX_EDGE = 0.05


def normalize_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Centre on the bounding-box centre and scale the longest side to 1 (in place, returned)."""
    lo, hi = mesh.bounds
    mesh.apply_translation(-(lo + hi) / 2)
    mesh.apply_scale(1.0 / float(np.max(hi - lo)))
    return mesh


def _finish(
    mesh: trimesh.Trimesh, color: tuple[float, float, float] | None, max_edge: float
) -> trimesh.Trimesh:
    """Merge, subdivide long edges, fix winding, normalise and paint a single colour."""
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    normalize_mesh(mesh)
    while mesh.edges_unique_length.max() > max_edge:  # midpoint subdivision keeps it watertight
        mesh = mesh.subdivide()
    trimesh.repair.fix_normals(mesh)
    paint(mesh, np.full((len(mesh.vertices), 3), color if color is not None else (0.7, 0.7, 0.7)))
    return mesh


def paint(mesh: trimesh.Trimesh, rgb: NDArray[np.floating]) -> trimesh.Trimesh:
    """Set vertex colours from float RGB (n, 3) in [0, 1] (in place, returned)."""
    rgba = np.concatenate([np.clip(rgb, 0, 1), np.ones((len(rgb), 1))], axis=1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.round(rgba * 255).astype(np.uint8))
    return mesh


def vertex_colors(mesh: trimesh.Trimesh) -> NDArray[np.float32]:
    """Float RGB (n, 3) in [0, 1] of a mesh with vertex colours."""
    return (np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0).astype(np.float32)


def sphere(*, subdivisions: int = 4, color: tuple[float, float, float] | None = None) -> trimesh.Trimesh:
    """Unit-diameter icosphere (subdivisions 4: 5120 faces)."""
    return _finish(trimesh.creation.icosphere(subdivisions=subdivisions), color, 1.0)


def box(
    extents: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    max_edge: float = DEFAULT_MAX_EDGE,
    color: tuple[float, float, float] | None = None,
) -> trimesh.Trimesh:
    """Axis-aligned box (a cube by default), longest side scaled to 1."""
    return _finish(trimesh.creation.box(extents=extents), color, max_edge)


def _profile(points: list[tuple[float, float]], step: float) -> NDArray[np.float64]:
    """Densify a polyline of (radius, z) points so no segment is longer than ``step``."""
    out = [np.asarray(points[0], dtype=np.float64)]
    for a, b in zip(points[:-1], points[1:], strict=True):
        n = max(1, int(np.ceil(np.hypot(b[0] - a[0], b[1] - a[1]) / step)))
        out.extend(np.linspace(a, b, n + 1)[1:])
    return np.asarray(out)


def cylinder(
    radius: float = 0.5, height: float = 1.0, *, sections: int = 64, color: tuple[float, float, float] | None = None
) -> trimesh.Trimesh:
    """Cylinder along +Z (a revolved profile, so caps and side are finely tessellated)."""
    h = height / 2
    profile = _profile([(0.0, -h), (radius, -h), (radius, h), (0.0, h)], DEFAULT_MAX_EDGE * max(radius, height))
    return _finish(trimesh.creation.revolve(profile, sections=sections), color, 1.0)


def cone(
    radius: float = 0.5, height: float = 1.0, *, sections: int = 64, color: tuple[float, float, float] | None = None
) -> trimesh.Trimesh:
    """Cone along +Z, apex up."""
    profile = _profile([(0.0, -height / 2), (radius, -height / 2), (0.0, height / 2)], DEFAULT_MAX_EDGE * height)
    return _finish(trimesh.creation.revolve(profile, sections=sections), color, 1.0)


def torus(
    major_radius: float = 0.35, minor_radius: float = 0.15, *, sections: int = 64,
    color: tuple[float, float, float] | None = None,
) -> trimesh.Trimesh:
    """Torus around +Z (a hole that carving sees through from the top views)."""
    mesh = trimesh.creation.torus(
        major_radius=major_radius, minor_radius=minor_radius, major_sections=sections, minor_sections=sections // 2
    )
    return _finish(mesh, color, 1.0)


def capsule(
    radius: float = 0.25, height: float = 0.5, *, color: tuple[float, float, float] | None = None
) -> trimesh.Trimesh:
    """Capsule along +Z (``height`` is the length of the cylindrical part)."""
    return _finish(trimesh.creation.capsule(height=height, radius=radius, count=[48, 48]), color, 1.0)


def bowl(
    *, depth: float = 0.8, thickness: float = 0.08, sections: int = 96, color: tuple[float, float, float] | None = None
) -> trimesh.Trimesh:
    """A concave bowl opening towards +Z: the object that visual-hull carving cannot recover.

    A solid of revolution of a closed profile: outer spherical cap from the bottom pole up
    to the rim, a flat rim, and the inner cap back down (``depth`` is the cap height over
    the outer radius 1, before normalisation).
    """
    theta_max = np.arccos(1.0 - depth)
    theta = np.linspace(0.0, theta_max, 48)
    outer = np.stack([np.sin(theta), -np.cos(theta)], axis=1)  # (r, z), bottom pole to rim
    r_in = 1.0 - thickness
    inner_theta = np.linspace(theta_max, 0.0, 48)
    z_rim = outer[-1, 1]
    inner = np.stack([r_in * np.sin(inner_theta), -r_in * np.cos(inner_theta)], axis=1)
    inner[:, 1] += z_rim - inner[0, 1]  # inner cap shares the rim height
    rim = np.linspace(outer[-1], inner[0], 5)[1:-1]
    profile = np.concatenate([outer, rim, inner])
    profile[0, 0] = profile[-1, 0] = 0.0
    mesh = trimesh.creation.revolve(profile, sections=sections)
    return _finish(mesh, color, 1.0)  # already fine; subdividing would add T-junctions


def cup(
    *, radius: float = 0.4, height: float = 0.9, wall: float = 0.06, base: float = 0.08, sections: int = 96,
    color: tuple[float, float, float] | None = None,
) -> trimesh.Trimesh:
    """A cup (hollow cylinder with a floor) opening towards +Z: a deep hollow whose floor the
    60 deg views see but whose inside no silhouette reveals."""
    h, r_in = height / 2, radius - wall
    points = [(0.0, -h), (radius, -h), (radius, h), (r_in, h), (r_in, -h + base), (0.0, -h + base)]
    profile = _profile(points, DEFAULT_MAX_EDGE * height)
    return _finish(trimesh.creation.revolve(profile, sections=sections), color, 1.0)


def _union_of_boxes(
    boxes: list[tuple[tuple[float, float, float], tuple[float, float, float]]], max_edge: float = DEFAULT_MAX_EDGE
) -> trimesh.Trimesh:
    """The boundary of a union of axis-aligned boxes (centre, extents), as one watertight mesh.

    Concatenating the boxes would keep the faces where two boxes touch: they lie inside the
    union, and a Chamfer distance sampling the truth there measures a surface no view can see.
    Instead, space is cut into cells along every box's bounds (and every ``max_edge``), and
    the faces between a cell inside some box and one outside all become two triangles each.
    """
    lo = np.array([np.subtract(c, np.divide(e, 2)) for c, e in boxes])
    hi = np.array([np.add(c, np.divide(e, 2)) for c, e in boxes])
    axes = []
    for a in range(3):
        cuts = np.unique(np.round(np.concatenate([lo[:, a], hi[:, a]]), 9))
        pairs = zip(cuts[:-1], cuts[1:], strict=True)
        fine = [np.linspace(x0, x1, int(np.ceil((x1 - x0) / max_edge)) + 1)[:-1] for x0, x1 in pairs]
        axes.append(np.concatenate([*fine, cuts[-1:]]))
    centres = np.meshgrid(*[(x[:-1] + x[1:]) / 2 for x in axes], indexing="ij")
    cell = np.zeros(centres[0].shape, bool)
    for b_lo, b_hi in zip(lo, hi, strict=True):
        cell |= np.all([(c > b_lo[a]) & (c < b_hi[a]) for a, c in enumerate(centres)], axis=0)
    inside = np.pad(cell, 1)
    shape = tuple(len(x) for x in axes)
    corner = np.arange(np.prod(shape)).reshape(shape)  # vertex id of every grid corner
    faces, eye = [], np.eye(3, dtype=int)
    for a in range(3):
        u, v = [b for b in range(3) if b != a]
        rest = [slice(1, -1)] * 3
        before = inside[tuple(slice(0, -1) if b == a else rest[b] for b in range(3))]  # cell below plane i
        after = inside[tuple(slice(1, None) if b == a else rest[b] for b in range(3))]  # cell above it
        for outward_minus, cells in ((False, before & ~after), (True, ~before & after)):
            for idx in np.argwhere(cells):  # idx[a] is the plane, idx[u], idx[v] the cell's corner
                quad = [corner[tuple(idx + eye[u] * du + eye[v] * dv)]
                        for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1))]  # normal along e_u x e_v
                if outward_minus ^ (a == 1):  # e_u x e_v is -e_a for a = 1 (x cross z = -y)
                    quad = quad[::-1]
                faces += [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    mesh = trimesh.Trimesh(points, np.asarray(faces), process=False)
    mesh.remove_unreferenced_vertices()
    return mesh


def table(*, color: tuple[float, float, float] | None = None) -> trimesh.Trimesh:
    """A table: a top slab on four legs (a composed shape with thin parts and a gap under it)."""
    top = ((0.0, 0.0, 0.3), (1.0, 0.7, 0.08))
    legs = [((sx * 0.42, sy * 0.27, -0.07), (0.08, 0.08, 0.66)) for sx in (-1, 1) for sy in (-1, 1)]
    mesh = _union_of_boxes([top, *legs])
    normalize_mesh(mesh)
    paint(mesh, np.full((len(mesh.vertices), 3), color if color is not None else (0.7, 0.7, 0.7)))
    return mesh


def stacked(*, color: tuple[float, float, float] | None = None) -> trimesh.Trimesh:
    """Three boxes stacked off-centre (steps and overhangs)."""
    boxes = [
        ((0.0, 0.0, -0.3), (1.0, 0.8, 0.3)),
        ((0.15, 0.1, 0.0), (0.6, 0.5, 0.3)),
        ((-0.1, 0.1, 0.25), (0.3, 0.3, 0.2)),
    ]
    mesh = _union_of_boxes(boxes)
    normalize_mesh(mesh)
    paint(mesh, np.full((len(mesh.vertices), 3), color if color is not None else (0.7, 0.7, 0.7)))
    return mesh


def patterned(mesh: trimesh.Trimesh, *, frequency: float = 9.0) -> trimesh.Trimesh:
    """Paint a smooth 3D colour pattern so photo-consistency can locate the surface (in place)."""
    p = np.asarray(mesh.vertices)
    rgb = 0.5 + 0.4 * np.stack(
        [np.sin(frequency * p[:, 0] + 1.0), np.sin(frequency * p[:, 1] + 2.0), np.sin(frequency * p[:, 2])], axis=1
    )
    return paint(mesh, rgb)


TWO_COLORS: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0.9, 0.15, 0.1), (0.1, 0.3, 0.9))


def two_colored_sphere() -> trimesh.Trimesh:
    """A sphere whose upper half (z > 0) is red and lower half blue (:data:`TWO_COLORS`)."""
    mesh = sphere()
    top, bottom = (np.asarray(c) for c in TWO_COLORS)
    z = np.asarray(mesh.vertices)[:, 2:3]
    return paint(mesh, np.where(z > 0, top, bottom))


def two_color_truth(points: NDArray[np.floating]) -> NDArray[np.float32]:
    """The true colour of :func:`two_colored_sphere` at surface points (p, 3)."""
    top, bottom = (np.asarray(c, dtype=np.float32) for c in TWO_COLORS)
    return np.where(points[:, 2:3] > 0, top, bottom).astype(np.float32)
