"""MeshExport: the 32 views + masks -> a mesh file in ComfyUI's output folder, a MESH, and
a 3D preview."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from torch import Tensor

from ._checks import check_choice, first_error
from ._comfy import MESH, comfy_utils, folder_paths, io, model_management, schema
from ._convert import check_image, check_mask

if TYPE_CHECKING:
    from ..mvdpp_core.reconstruction import ReconstructedMesh

METHODS = ["fast", "quality"]
FORMATS = ["glb", "obj", "ply"]
MAX_NAME_BYTES = 255  # NAME_MAX of the common file systems
FILE_SUFFIX_BYTES = 16  # "_00001_.glb" plus room for a longer counter
MAX_PREFIX_BYTES = 1024
# reconstruct() ignores up to this many views whose masks contradict the others.
MAX_OUTLIER_VIEWS = 2


def check_prefix(filename_prefix: str) -> str:
    """Refuse prefixes that would leave the output folder or that no file system takes
    (control characters such as NUL, over-long names); subfolders are fine."""
    prefix = filename_prefix.strip()
    if not prefix:
        raise ValueError("filename_prefix is empty; give a name such as 'mvdpp/mesh'.")
    bad = sorted({c for c in prefix if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(
            f"filename_prefix {filename_prefix!r} contains the control character(s) {bad}, which file names "
            "cannot hold; remove them (e.g. 'mvdpp/mesh')."
        )
    for pure in (PurePosixPath(prefix), PureWindowsPath(prefix)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise ValueError(
                f"filename_prefix {filename_prefix!r} points outside ComfyUI's output folder; use a relative "
                "name such as 'mvdpp/mesh' (subfolders are allowed, '..' and absolute paths are not)."
            )
    parts = PureWindowsPath(prefix).parts  # splits on both '/' and '\\'
    longest = max(len(part.encode()) for part in parts[:-1]) if len(parts) > 1 else 0
    if len(parts[-1].encode()) > MAX_NAME_BYTES - FILE_SUFFIX_BYTES or longest > MAX_NAME_BYTES:
        raise ValueError(
            f"filename_prefix has a name part of {max(longest, len(parts[-1].encode()))} bytes; file systems allow "
            f"{MAX_NAME_BYTES} per name, and the counter and extension need {FILE_SUFFIX_BYTES}. Shorten it to at "
            f"most {MAX_NAME_BYTES - FILE_SUFFIX_BYTES} characters per part (e.g. 'mvdpp/mesh')."
        )
    if len(prefix.encode()) > MAX_PREFIX_BYTES:
        raise ValueError(
            f"filename_prefix is {len(prefix.encode())} bytes long; give at most {MAX_PREFIX_BYTES} "
            "(e.g. 'mvdpp/mesh')."
        )
    return prefix


def check_inside(folder: Path, root: Path, filename_prefix: str) -> None:
    """Raise unless ``folder`` (existing or not) resolves inside ``root``: a symlinked
    subfolder cannot lead out of the output folder."""
    if not folder.resolve().is_relative_to(root):
        raise ValueError(
            f"filename_prefix {filename_prefix!r} resolves to {folder.resolve()}, outside the output folder "
            f"{root}; use a subfolder that is a real folder inside it."
        )


def output_path(filename_prefix: str, extension: str) -> tuple[Path, str, str]:
    """The next free ``<prefix>_<counter>_.<ext>`` in the output folder.

    Returns the full path, the subfolder and the file name. The folder is checked to lie
    inside the output folder before ComfyUI's ``get_save_image_path`` creates it.
    """
    output_dir = folder_paths.get_output_directory()
    prefix = check_prefix(filename_prefix)
    root = Path(output_dir).resolve()
    check_inside((Path(output_dir) / prefix).parent, root, filename_prefix)
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir)
    filename = f"{name}_{counter:05}_.{extension}"
    path = Path(folder) / filename
    check_inside(path.parent, root, filename_prefix)
    return path, subfolder, filename


def check_not_inverted(masks: Tensor) -> None:
    """Refuse rig masks that mark the background as object (they would carve a speck)."""
    from ..mvdpp_core.segment import inverted_views

    inverted = inverted_views(masks)
    if len(inverted) > MAX_OUTLIER_VIEWS:
        raise ValueError(
            f"the masks of {len(inverted)} views (e.g. {inverted[:8]}) mark the image border as object, so they "
            "look inverted (1 must be the object). Connect the masks output of the multi-view sampler, or add an "
            "InvertMask node (core LoadImage's MASK is 1 where the picture is transparent)."
        )


def progress_callback() -> Callable[..., None]:
    """Advance ComfyUI's progress bar with the reconstruction and stop there on Cancel."""
    progress = comfy_utils.ProgressBar(1)

    def on_progress(step: int, total: int) -> None:
        model_management.throw_exception_if_processing_interrupted()
        progress.update_absolute(step, total)

    return on_progress


def mesh_takes_colours() -> bool:
    """Whether the running ComfyUI's MESH carries per-vertex colours (its constructor takes
    ``vertex_colors``, as 0.38's does); 0.3.75's holds geometry only."""
    return "vertex_colors" in inspect.signature(MESH).parameters


def to_comfy_mesh(mesh: ReconstructedMesh) -> MESH:
    """ComfyUI's MESH (batched: vertices (1, n, 3) float32, faces (1, f, 3) int64) in glTF's
    +Y-up frame, since SaveGLB writes MESH vertices as they are; a rotation, so faces keep
    their outward winding. Where the running ComfyUI's MESH takes them, also the vertex
    colours (1, n, 3) in [0, 1] and the vertex normals (1, n, 3), so core Save GLB and its
    preview show the mesh coloured and smooth; else geometry only."""
    from ..mvdpp_core.reconstruction.export import gltf_arrays

    arrays = {name: value[None].contiguous() for name, value in gltf_arrays(mesh).items()}
    fields = inspect.signature(MESH).parameters
    extras = {name: arrays[name] for name in ("vertex_colors", "normals") if name in fields}
    return MESH(arrays["vertices"], arrays["faces"], **extras)


class MeshExport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        coloured = mesh_takes_colours()
        return schema(
            node_id="MVDPP_MeshExport",
            search_aliases=["mvdiffusion", "mvdpp", "image to 3d", "mesh", "glb", "3d reconstruction", "visual hull"],
            display_name="MVDiffusion++ Mesh Export",
            category="MVDiffusion++/3d",
            description="Reconstructs a coloured mesh from the 32 views and masks and saves it, with its colours, in "
            "the output folder; the MESH output carries " + (
                "the vertex colours too." if coloured else "geometry only (this ComfyUI's MESH type has no colours)."
            ),
            is_output_node=True,
            inputs=[
                io.Image.Input("views", tooltip="The 32 views from the multi-view sampler, in rig order."),
                io.Mask.Input("masks", tooltip="The 32 masks from the multi-view sampler."),
                io.Combo.Input(
                    "method", options=METHODS, default="fast",
                    tooltip="fast: visual hull carving + colours projected from the views (seconds); quality: the "
                    "hull carved further where the views disagree on colour (opens cups and bowls; seconds on a CPU). "
                    "Views that disagree everywhere (a weak model's) raise its threshold: it keeps the fast mesh.",
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
                io.Mesh.Output(
                    display_name="mesh",
                    tooltip=(
                        "The mesh (glTF axes, +Y up) with its vertex colours and normals, for core MESH nodes such "
                        "as Save GLB."
                        if coloured
                        else "The mesh geometry (glTF axes, +Y up) for core MESH nodes such as Save GLB. This "
                        "ComfyUI's MESH type holds no colours (newer releases' does), so Save GLB writes it "
                        "uncoloured; the file this node saves keeps the vertex colours (connect 'path' to Preview "
                        "3D for a coloured preview)."
                    ),
                ),
                io.String.Output(
                    display_name="path",
                    tooltip="The saved file with its colours, relative to the output folder (connect it to Preview "
                    "3D's model_file for a coloured preview).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(
        cls, filename_prefix: str | None = None, method: str | None = None, format: str | None = None
    ) -> bool | str:
        """Refuse unknown options and unusable prefixes before the upstream sampling runs."""
        return first_error(
            lambda: check_choice("method", method, METHODS),
            lambda: check_choice("format", format, FORMATS),
            # None: linked from another node, checked when it runs
            lambda: filename_prefix is None or check_prefix(filename_prefix),
        )

    @classmethod
    def execute(
        cls, views: Tensor, masks: Tensor, method: str, resolution: int, format: str, filename_prefix: str
    ) -> io.NodeOutput:
        from ..mvdpp_core.common import composite_on_white
        from ..mvdpp_core.reconstruction import export_mesh, reconstruct

        masks = check_mask(masks, "masks")
        check_not_inverted(masks)
        path, subfolder, filename = output_path(filename_prefix, format)
        # The views on white through their masks, as the core hands generated views over
        # (MultiViewResult.for_reconstruction): the masks decide the extent, colours only trim it.
        mesh = reconstruct(
            composite_on_white(check_image(views, "views")[..., :3], masks[..., None]), masks,
            method=method, resolution=resolution, callback=progress_callback(),
            outlier_views=MAX_OUTLIER_VIEWS,
        )
        export_mesh(mesh, path, format=format)
        relative = os.path.join(subfolder, filename).replace(os.sep, "/")
        ui = {"3d": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}
        return io.NodeOutput(to_comfy_mesh(mesh), relative, ui=ui)
