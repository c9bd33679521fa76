"""Reconstruction: 32 rig views + masks -> textured mesh, export, and evaluation metrics.

    from mvdpp_core.reconstruction import reconstruct, export_mesh
    mesh = reconstruct(views, masks, method="fast", resolution=128)   # (32, H, W, 3), (32, H, W)
    export_mesh(mesh, "out/object.glb")                               # +Y up for glTF viewers

Modules: ``render`` (pure-PyTorch rasteriser), ``carving`` (robust visual hull), ``photo``
(photo-consistency carving, the quality path), ``sdf`` (its optional NeuS-style fit),
``meshing``, ``texturing``, ``export``, ``metrics``, ``shapes`` (procedural test objects).
Never imports ComfyUI.
"""

from __future__ import annotations

from .export import export_mesh, load_mesh
from .mesh import MeshFormat, Method, ReconstructedMesh
from .metrics import chamfer_distance, chamfer_terms, composite_on_white, lpips, psnr, ssim, volume_iou
from .pipeline import mesh_from_trimesh, reconstruct
from .render import RenderResult, UVTexture, render_mesh, render_trimesh
from .sdf import SDFConfig

__all__ = [
    "MeshFormat",
    "Method",
    "ReconstructedMesh",
    "RenderResult",
    "SDFConfig",
    "UVTexture",
    "chamfer_distance",
    "chamfer_terms",
    "composite_on_white",
    "export_mesh",
    "load_mesh",
    "lpips",
    "mesh_from_trimesh",
    "psnr",
    "reconstruct",
    "render_mesh",
    "render_trimesh",
    "ssim",
    "volume_iou",
]
