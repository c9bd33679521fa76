"""Write and read meshes (GLB, OBJ + MTL + PNG, PLY) through trimesh, frames handled here.

Frames: our world is +Z up (DESIGN section 3); glTF is +Y up. GLB export therefore rotates
every vertex (x, y, z) -> (x, z, -y) (-90 deg about +X), so viewers (ComfyUI's
Preview3D, Blender, three.js) show the object upright; :func:`load_mesh` undoes it.
OBJ and PLY carry no axis convention and are written in our +Z-up frame unchanged (in
Blender's OBJ importer pick "Up: Z, Forward: Y" to see them upright).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh

from ..common import parse_enum
from .mesh import MeshFormat, ReconstructedMesh
from .meshing import vertex_normals

# (x, y, z) -> (x, z, -y): our +Z-up world to glTF's +Y-up.
Z_UP_TO_Y_UP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
Y_UP_TO_Z_UP = Z_UP_TO_Y_UP.T


def vertices_y_up(vertices: object) -> torch.Tensor:
    """Vertices (n, 3) of our +Z-up world in glTF's +Y-up frame, float32 (what a GLB holds).
    A rotation, so faces keep their outward winding."""
    rotation = torch.as_tensor(Z_UP_TO_Y_UP[:3, :3], dtype=torch.float32)
    return torch.as_tensor(vertices, dtype=torch.float32) @ rotation.T


def gltf_arrays(mesh: ReconstructedMesh) -> dict[str, torch.Tensor]:
    """The mesh as a glTF file holds it, as tensors: ``vertices`` (n, 3) float32 and
    ``normals`` (n, 3) float32 (unit, area-weighted over the faces around each vertex,
    pointing out) in glTF's +Y-up frame; ``faces`` (f, 3) int64 with their outward winding;
    ``vertex_colors`` (n, 3) float32 in [0, 1]. What a consumer of glTF-frame meshes (ComfyUI's
    MESH) takes; a UV texture is not included (export_mesh writes it to files)."""
    return {
        "vertices": vertices_y_up(mesh.vertices),
        "faces": torch.as_tensor(mesh.faces, dtype=torch.int64),
        "vertex_colors": torch.as_tensor(np.clip(mesh.vertex_colors, 0.0, 1.0), dtype=torch.float32),
        "normals": vertices_y_up(vertex_normals(mesh.vertices, mesh.faces)),
    }


# Suffixes that name a mesh format: one of these that disagrees with ``format`` is an error.
_MESH_SUFFIXES = frozenset({"glb", "gltf", "obj", "ply", "stl", "fbx", "usd", "usdz", "off", "dae", "3mf"})


def _resolve(path: str | Path, fmt: MeshFormat | str | None) -> tuple[Path, MeshFormat]:
    path = Path(path)
    if fmt is None:
        if not path.suffix:
            raise ValueError(f"cannot tell the format of {str(path)!r}; add a .glb/.obj/.ply suffix or pass format=.")
        fmt = path.suffix
    fmt = parse_enum(MeshFormat, fmt, "format")
    suffix = path.suffix.lower().lstrip(".")
    if suffix in _MESH_SUFFIXES and suffix != fmt.value:
        # Appending would write "m.obj.glb": a file no one asked for, under a misleading name.
        raise ValueError(
            f"path {str(path)!r} ends in .{suffix} but format={fmt.value!r}; make them agree: "
            f"write to {str(path.with_suffix('.' + fmt.value))!r}, pass format={suffix!r}, or omit format."
        )
    if suffix != fmt.value:
        path = path.with_name(path.name + f".{fmt.value}")
    return path, fmt


def export_mesh(
    mesh: ReconstructedMesh | trimesh.Trimesh, path: str | Path, format: MeshFormat | str | None = None
) -> Path:
    """Write ``mesh`` (in our +Z-up frame) to ``path``; returns the path written.

    ``format``: "glb", "obj" or "ply" (default: from the suffix; the suffix is added when
    missing; a mesh suffix that disagrees with ``format``, e.g. ``m.obj`` with "glb", is an
    error). GLB is rotated to +Y up, (x, y, z) -> (x, z, -y), and embeds the UV texture
    or vertex colours. OBJ writes ``name.obj`` + ``material.mtl`` + a PNG texture next to it
    when textured (else per-vertex colours on the ``v`` lines). PLY stores vertex colours
    only (a textured mesh is exported with its per-vertex colours).
    """
    path, fmt = _resolve(path, format)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(mesh, ReconstructedMesh):
        textured = mesh.has_texture and fmt is not MeshFormat.PLY
        tm = mesh.to_trimesh(textured=textured)
    else:
        tm = mesh.copy()
    if fmt is MeshFormat.GLB:
        tm.apply_transform(Z_UP_TO_Y_UP)
        path.write_bytes(tm.export(file_type="glb"))
    elif fmt is MeshFormat.OBJ:
        tm.export(path, file_type="obj", include_color=True, include_texture=True)
    else:
        tm.export(path, file_type="ply", encoding="binary")
    return path


def load_mesh(path: str | Path) -> trimesh.Trimesh:
    """Read a mesh written by :func:`export_mesh` back into our +Z-up frame (one Trimesh,
    scene nodes flattened, GLB rotated back with (x, y, z) -> (x, -z, y))."""
    path = Path(path)
    _, fmt = _resolve(path, None)
    mesh = trimesh.load(path, force="mesh", process=False)
    if fmt is MeshFormat.GLB:
        mesh.apply_transform(Y_UP_TO_Z_UP)
    return mesh


def surface_colors(mesh: trimesh.Trimesh, points: np.ndarray, face_index: np.ndarray) -> np.ndarray:
    """RGB (p, 3) in [0, 1] of a loaded mesh at surface points on faces ``face_index``,
    from its texture (bilinear UV lookup) or its vertex colours (barycentric)."""
    tri = mesh.triangles[face_index]
    bary = trimesh.triangles.points_to_barycentric(tri, points)  # p 3
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None:
        uv = np.einsum("pc,pck->pk", bary, np.asarray(visual.uv)[mesh.faces[face_index]])
        return visual.material.to_color(uv)[:, :3] / 255.0
    colors = np.asarray(visual.vertex_colors)[:, :3] / 255.0
    return np.einsum("pc,pck->pk", bary, colors[mesh.faces[face_index]])
