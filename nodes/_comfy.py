"""The one module that imports ComfyUI: its V3 node API and the runtime services we use.

Keeping every ``comfy*`` / ``folder_paths`` import here means the rest of ``nodes/``
reads as plain adapters, and a test can see in one place what the pack needs from
ComfyUI.
"""

from __future__ import annotations

import comfy.model_management as model_management
import comfy.utils as comfy_utils
import folder_paths
from comfy_api.latest import ComfyExtension, Types, io

MESH = Types.MESH

# Our own socket types; core types (IMAGE, MASK, MESH, CLIP_VISION) everywhere else.
MVDPPModelSocket = io.Custom("MVDPP_MODEL")
MVDPPCondSocket = io.Custom("MVDPP_COND")

__all__ = [
    "MESH",
    "ComfyExtension",
    "MVDPPCondSocket",
    "MVDPPModelSocket",
    "comfy_utils",
    "folder_paths",
    "io",
    "model_management",
]
