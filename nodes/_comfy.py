"""The one module that imports ComfyUI: its V3 node API and the runtime services we use.

Keeping every ``comfy*`` / ``folder_paths`` import here means the rest of ``nodes/``
reads as plain adapters, and a test can see in one place what the pack needs from
ComfyUI.
"""

from __future__ import annotations

import dataclasses

import comfy.model_management as model_management
import comfy.utils as comfy_utils
import folder_paths
from comfy_api.latest import ComfyExtension, Types, io

MESH = Types.MESH

# Our own socket types; core types (IMAGE, MASK, MESH, CLIP_VISION) everywhere else.
MVDPPModelSocket = io.Custom("MVDPP_MODEL")
MVDPPCondSocket = io.Custom("MVDPP_COND")


def schema(*, search_aliases: list[str], **fields) -> io.Schema:
    """``io.Schema(**fields)``, with ``search_aliases`` (other words the node search finds the
    node by) where the running ComfyUI's Schema has that field: later releases do (0.38's), and
    0.3.75's would refuse the keyword, so there the aliases are left out."""
    if any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema)):
        fields["search_aliases"] = search_aliases
    return io.Schema(**fields)


def core_background_removal() -> bool:
    """Whether the running ComfyUI has core background removal: Load Background Removal Model and
    Remove Background, whose MASK is 1 on the object (later releases, 0.38's, found from their
    ``BackgroundRemoval`` socket type); 0.3.75 has none."""
    return hasattr(io, "BackgroundRemoval")


__all__ = [
    "MESH",
    "ComfyExtension",
    "MVDPPCondSocket",
    "MVDPPModelSocket",
    "comfy_utils",
    "core_background_removal",
    "folder_paths",
    "io",
    "model_management",
    "schema",
]
