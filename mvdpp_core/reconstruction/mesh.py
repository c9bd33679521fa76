"""The reconstructed mesh type and the enums of the reconstruction API."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import numpy as np
import trimesh
from numpy.typing import NDArray


class Method(str, enum.Enum):
    """Reconstruction method: visual-hull carving, or an SDF fitted by volume rendering."""

    FAST = "fast"
    QUALITY = "quality"


class MeshFormat(str, enum.Enum):
    """Export formats (all written by trimesh)."""

    GLB = "glb"
    OBJ = "obj"
    PLY = "ply"


@dataclass(frozen=True)
class ReconstructedMesh:
    """A triangle mesh in the design's +Z-up world frame (DESIGN section 3).

    vertices (n, 3) float32; faces (f, 3) int64 with outward (counter-clockwise) winding;
    vertex_colors (n, 3) float32 in [0, 1]; optionally uv (n, 2) float32 in [0, 1]
    (v up, OBJ / trimesh convention) and texture (th, tw, 3) float32 in [0, 1] for the
    same vertices (vertices are split along UV seams, so n counts the split copies).
    ``dropped_views`` lists the rig views whose masks contradicted the others (ignored).
    """

    vertices: NDArray[np.float32]
    faces: NDArray[np.int64]
    vertex_colors: NDArray[np.float32]
    uv: NDArray[np.float32] | None = None
    texture: NDArray[np.float32] | None = None
    dropped_views: tuple[int, ...] = ()  # rig views whose masks were ignored as inconsistent

    @property
    def has_texture(self) -> bool:
        return self.uv is not None and self.texture is not None

    def to_trimesh(self, *, textured: bool | None = None) -> trimesh.Trimesh:
        """A ``trimesh.Trimesh`` (our frame) with a PBR texture if present (or asked), else
        vertex colours."""
        textured = self.has_texture if textured is None else textured
        if textured and not self.has_texture:
            raise ValueError("textured=True but this mesh has no UV texture; reconstruct with texture_size > 0.")
        mesh = trimesh.Trimesh(self.vertices, self.faces, process=False)
        if textured:
            from PIL import Image

            image = Image.fromarray(np.round(np.clip(self.texture, 0, 1) * 255).astype(np.uint8))
            material = trimesh.visual.material.PBRMaterial(
                baseColorTexture=image, metallicFactor=0.0, roughnessFactor=1.0
            )
            mesh.visual = trimesh.visual.TextureVisuals(uv=self.uv, material=material)
        else:
            rgba = np.concatenate([self.vertex_colors, np.ones((len(self.vertices), 1), np.float32)], axis=1)
            mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.round(rgba * 255).astype(np.uint8))
        return mesh

    def without_texture(self) -> ReconstructedMesh:
        return replace(self, uv=None, texture=None)
