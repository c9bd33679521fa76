"""Arranging and picking the 32 rig views: a 4 x 8 contact sheet, one elevation row, or
chosen view indices, with masks composited on a background colour.

Rig order is ``i = e * 8 + a`` (see :mod:`mvdpp_core.cameras`), so the grid's row ``e``
holds elevation ``ELEVATIONS_DEG[e]`` (-30 deg at the top, 60 deg at the bottom) and its
column ``a`` azimuth ``AZIMUTHS_DEG[a]``.
"""

from __future__ import annotations

import re

import torch
from einops import rearrange
from torch import Tensor

from .cameras import AZIMUTHS_DEG, ELEVATIONS_DEG, NUM_TARGET_VIEWS

_HEX_COLOR = re.compile(r"^#?([0-9a-fA-F]{6})$")


def check_rig_views(images: Tensor, name: str = "images") -> None:
    """Raise unless ``images`` is (32, C, H, W): all rig views in rig order."""
    if images.ndim != 4 or images.shape[0] != NUM_TARGET_VIEWS:
        raise ValueError(
            f"{name} have shape {tuple(images.shape)}; a rig grid needs all {NUM_TARGET_VIEWS} views "
            f"(32, C, H, W) in rig order, as the multi-view sampler outputs them."
        )


def view_grid(images: Tensor) -> Tensor:
    """(32, C, H, W) rig views -> one (C, 4H, 8W) image; rows = elevations, columns = azimuths."""
    check_rig_views(images)
    return rearrange(images, "(e a) c h w -> c (e h) (a w)", e=len(ELEVATIONS_DEG), a=len(AZIMUTHS_DEG))


def elevation_row(images: Tensor, row: int) -> Tensor:
    """The 8 views (8, C, H, W) of elevation row ``row`` (0..3 = -30, 0, 30, 60 deg)."""
    check_rig_views(images)
    if not 0 <= row < len(ELEVATIONS_DEG):
        allowed = ", ".join(f"{e} ({el:g} deg)" for e, el in enumerate(ELEVATIONS_DEG))
        raise ValueError(f"elevation row {row} does not exist; allowed rows: {allowed}.")
    a = len(AZIMUTHS_DEG)
    return images[row * a:(row + 1) * a]


def elevation_row_of(elevation_deg: float) -> int:
    """Row index of a rig elevation in degrees (one of ``ELEVATIONS_DEG``)."""
    for row, el in enumerate(ELEVATIONS_DEG):
        if abs(el - elevation_deg) < 1e-6:
            return row
    raise ValueError(f"elevation {elevation_deg:g} deg is not on the rig; allowed: {list(ELEVATIONS_DEG)}.")


def parse_view_indices(text: str) -> list[int]:
    """Parse ``"0, 8, 16-19"`` into ``[0, 8, 16, 17, 18, 19]`` (rig indices, order kept)."""
    indices: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if match is None:
            raise ValueError(
                f"cannot read view index {part!r} in {text!r}; write comma-separated indices or ranges "
                f"from 0 to {NUM_TARGET_VIEWS - 1}, e.g. '0, 8, 16-19'."
            )
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise ValueError(f"range {part!r} runs backwards; write it as '{stop}-{start}'.")
        indices.extend(range(start, stop + 1))
    bad = [i for i in indices if not 0 <= i < NUM_TARGET_VIEWS]
    if bad:
        raise ValueError(
            f"view indices {bad} are outside the rig; allowed 0 to {NUM_TARGET_VIEWS - 1} "
            "(index = elevation row * 8 + azimuth column)."
        )
    return indices


def select_views(images: Tensor, indices: list[int]) -> Tensor:
    """Views ``indices`` (k, C, H, W) of the (32, C, H, W) rig views."""
    check_rig_views(images)
    if not indices:
        raise ValueError("no view indices given; name at least one, e.g. '0'.")
    return images[torch.as_tensor(indices, dtype=torch.long)]


def parse_hex_color(text: str) -> tuple[float, float, float]:
    """``"#RRGGBB"`` (or without '#') -> RGB floats in [0, 1]."""
    match = _HEX_COLOR.match(text.strip())
    if match is None:
        raise ValueError(f"background colour {text!r} is not a hex colour; write it as '#RRGGBB', e.g. '#FFFFFF'.")
    value = match.group(1)
    return tuple(int(value[i:i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def composite(images: Tensor, masks: Tensor, color: tuple[float, float, float]) -> Tensor:
    """Images (v, 3, H, W) over a flat ``color`` through masks (v, 1, H, W) or (v, H, W)."""
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}; connect the MASK output "
            "that came with these images (one mask per view, same size)."
        )
    background = torch.tensor(color, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    masks = masks.to(images.dtype)
    return images * masks + background * (1 - masks)
