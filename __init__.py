"""ComfyUI entry point of the MVDiffusion++ node pack (V3 node API).

ComfyUI imports this file when the repository sits in ``ComfyUI/custom_nodes/``. Nothing
happens at import time; ComfyUI calls :func:`comfy_entrypoint` to get the nodes.
"""

from __future__ import annotations

from typing import Any


async def comfy_entrypoint() -> Any:
    """The pack's ``ComfyExtension``; also registers the ``mvdpp`` model folder."""
    from .nodes import MVDPPExtension, register_model_folder

    # Before the node list is built: LoadMVDPP's checkpoint list reads this folder.
    register_model_folder()
    return MVDPPExtension()
