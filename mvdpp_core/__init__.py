"""mvdpp_core: MVDiffusion++ (Tang et al., ECCV 2024) as a self-contained library.

Importing this package is cheap: submodules (and torch / diffusers) load on first use.

    from mvdpp_core import load_checkpoint, generate
    model = load_checkpoint("model.safetensors")
    result = generate(model, images, masks, seed=0)   # 32 views + masks on the rig
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "config",
    "PredictionType": "config",
    "preset": "config",
    "MVDPPModel": "model",
    "Condition": "model",
    "generate": "pipeline",
    "MultiViewResult": "pipeline",
    "SamplerName": "samplers",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "convert_sd2_inpainting": "checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
