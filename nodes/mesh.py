"""MeshExport: the 32 views + masks -> a mesh file in ComfyUI's output folder, a MESH, and
a 3D preview."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import Tensor

from ._comfy import MESH, comfy_utils, folder_paths, io, model_management
from ._convert import check_image, check_mask

METHODS = ["fast", "quality"]
FORMATS = ["glb", "obj", "ply"]


def check_prefix(filename_prefix: str) -> str:
    """Refuse prefixes that would leave the output folder; subfolders are fine."""
    prefix = filename_prefix.strip()
    if not prefix:
        raise ValueError("filename_prefix is empty; give a name such as 'mvdpp/mesh'.")
    for pure in (PurePosixPath(prefix), PureWindowsPath(prefix)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise ValueError(
                f"filename_prefix {filename_prefix!r} points outside ComfyUI's output folder; use a relative "
                "name such as 'mvdpp/mesh' (subfolders are allowed, '..' and absolute paths are not)."
            )
    return prefix


def output_path(filename_prefix: str, extension: str) -> tuple[Path, str, str]:
    """The next free ``<prefix>_<counter>_.<ext>`` in the output folder.

    Returns the full path, the subfolder and the file name; the resolved path is checked
    to lie inside the output folder (a symlinked subfolder cannot lead out of it).
    """
    output_dir = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(check_prefix(filename_prefix), output_dir)
    filename = f"{name}_{counter:05}_.{extension}"
    path = Path(folder) / filename
    root = Path(output_dir).resolve()
    if not path.resolve().is_relative_to(root):
        raise ValueError(
            f"filename_prefix {filename_prefix!r} resolves to {path.resolve()}, outside the output folder {root}; "
            "use a subfolder that is a real folder inside it."
        )
    return path, subfolder, filename


def progress_callback() -> Callable[..., None]:
    """Advance ComfyUI's progress bar with the reconstruction and stop there on Cancel."""
    progress = comfy_utils.ProgressBar(1)

    def on_progress(step: int, total: int) -> None:
        model_management.throw_exception_if_processing_interrupted()
        progress.update_absolute(step, total)

    return on_progress


def to_comfy_mesh(vertices: object, faces: object) -> MESH:
    """ComfyUI's MESH (batched vertices (1, n, 3) float32, faces (1, f, 3) int64) in glTF's
    +Y-up frame, since SaveGLB writes MESH vertices as they are; a rotation, so faces keep
    their outward winding."""
    from ..mvdpp_core.reconstruction.export import Z_UP_TO_Y_UP

    rotation = torch.as_tensor(Z_UP_TO_Y_UP[:3, :3], dtype=torch.float32)
    v = torch.as_tensor(vertices, dtype=torch.float32) @ rotation.T
    f = torch.as_tensor(faces, dtype=torch.int64)
    return MESH(v[None].contiguous(), f[None].contiguous())


class MeshExport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MVDPP_MeshExport",
            display_name="MVDiffusion++ Mesh Export",
            category="MVDiffusion++/3d",
            description="Reconstructs a coloured mesh from the 32 views and masks and saves it in the output folder.",
            is_output_node=True,
            inputs=[
                io.Image.Input("views", tooltip="The 32 views from the multi-view sampler, in rig order."),
                io.Mask.Input("masks", tooltip="The 32 masks from the multi-view sampler."),
                io.Combo.Input(
                    "method", options=METHODS, default="fast",
                    tooltip="fast: visual hull carving + colours projected from the views (seconds); quality: an "
                    "SDF fitted to the views by volume rendering (minutes on a CPU).",
                ),
                io.Int.Input(
                    "resolution", default=128, min=32, max=512, step=16,
                    tooltip="Voxel grid resolution of the reconstruction; higher is finer and slower.",
                ),
                io.Combo.Input("format", options=FORMATS, default="glb", tooltip="File format of the saved mesh."),
                io.String.Input(
                    "filename_prefix", default="mvdpp/mesh",
                    tooltip="File name prefix inside ComfyUI's output folder; subfolders allowed, '..' is not.",
                ),
            ],
            outputs=[
                io.Mesh.Output(display_name="mesh", tooltip="The mesh (glTF axes, +Y up), e.g. for Save GLB."),
                io.String.Output(
                    display_name="path",
                    tooltip="The saved file, relative to the output folder (connect to Preview 3D's model_file).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None) -> bool | str:
        if filename_prefix is None:  # linked from another node: checked when it runs
            return True
        try:
            check_prefix(filename_prefix)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(
        cls, views: Tensor, masks: Tensor, method: str, resolution: int, format: str, filename_prefix: str
    ) -> io.NodeOutput:
        from ..mvdpp_core.reconstruction import export_mesh, reconstruct

        path, subfolder, filename = output_path(filename_prefix, format)
        mesh = reconstruct(
            check_image(views, "views")[..., :3], check_mask(masks, "masks"),
            method=method, resolution=resolution, callback=progress_callback(),
        )
        export_mesh(mesh, path, format=format)
        relative = os.path.join(subfolder, filename).replace(os.sep, "/")
        ui = {"3d": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}
        return io.NodeOutput(to_comfy_mesh(mesh.vertices, mesh.faces), relative, ui=ui)
