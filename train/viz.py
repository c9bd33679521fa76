"""Validation grids: rig views as rows of elevations, written as PNG and to tensorboard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from einops import rearrange
from torch import Tensor

from mvdpp_core.grid import view_grid


def rig_grid(views: Tensor, cond: Tensor | None = None) -> np.ndarray:
    """(32, 3, H, W) in [0, 1], rig order -> (4H, 8W [+ W], 3) uint8: ``mvdpp_core.grid.view_grid``
    with the condition view (3, H, W) opening the first row, as an image array."""
    grid = rearrange(view_grid(views.float().clamp(0, 1)), "c h w -> h w c").numpy()
    if cond is not None:
        column = np.ones((grid.shape[0], cond.shape[-1], 3), dtype=np.float32)
        column[: cond.shape[-2]] = rearrange(cond.float().clamp(0, 1), "c h w -> h w c").numpy()
        grid = np.concatenate([column, grid], axis=1)
    return (grid * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
