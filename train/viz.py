"""Validation grids: rig views as rows of elevations, written as PNG and to tensorboard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from einops import rearrange
from torch import Tensor

from mvdpp_core.cameras import AZIMUTHS_DEG, ELEVATIONS_DEG


def rig_grid(views: Tensor, cond: Tensor | None = None) -> np.ndarray:
    """(32, 3, H, W) in [0, 1], rig order -> (4H, 8W [+ W], 3) uint8; rows = elevations
    (-30 at the top), columns = azimuths; the condition view (3, H, W) opens the first row."""
    grid = rearrange(
        views.float().clamp(0, 1), "(e a) c h w -> (e h) (a w) c", e=len(ELEVATIONS_DEG), a=len(AZIMUTHS_DEG)
    )
    if cond is not None:
        column = np.ones((grid.shape[0], cond.shape[-1], 3), dtype=np.float32)
        column[: cond.shape[-2]] = rearrange(cond.float().clamp(0, 1), "c h w -> h w c").numpy()
        grid = np.concatenate([column, grid.numpy()], axis=1)
    else:
        grid = grid.numpy()
    return (grid * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
