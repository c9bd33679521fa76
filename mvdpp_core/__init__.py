"""mvdpp_core: MVDiffusion++ (Tang et al., ECCV 2024) as a self-contained library.

Importing this package is cheap: submodules (and torch / diffusers) load on first use.

    from mvdpp_core import load_checkpoint, generate
    model = load_checkpoint("model.safetensors")
    result = generate(model, images, masks, seed=0)   # 32 views + masks on the rig

Data flows through three stages, each with one home:

* condition (``condition.py``): 1-10 photos (n, 3 or 4, H, W) + optional masks -> framed
  ``ConditionViews`` (mask / alpha / backdrop, recentred, on white) -> ``Condition``;
* diffusion (``pipeline.generate``): the core's image layout is channels-first,
  images (v, 3, H, W) and masks (v, 1, H, W) in [0, 1];
* reconstruction (``reconstruction.reconstruct``): the boundary layout is channels-last,
  views (32, H, W, 3) and masks (32, H, W), ComfyUI's IMAGE / MASK layout;
  ``MultiViewResult.for_reconstruction()`` hands generated views over in it.
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
