"""The ComfyUI nodes of MVDiffusion++: thin V3 adapters over ``mvdpp_core``.

Node ids are part of saved workflows: they never change once shipped.
"""

from __future__ import annotations

from ._comfy import ComfyExtension, io
from .encode import MaskAwareEncode
from .grid import ViewGrid
from .loader import LoadMVDPP, register_model_folder
from .mesh import MeshExport
from .sampler import MultiViewSampler

NODES: list[type[io.ComfyNode]] = [LoadMVDPP, MaskAwareEncode, MultiViewSampler, ViewGrid, MeshExport]


class MVDPPExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


__all__ = ["NODES", "MVDPPExtension", "register_model_folder"]
