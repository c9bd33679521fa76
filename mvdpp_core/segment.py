"""Foreground masks for photos that come without one, and checks on masks that do.

Why this exists: every condition view needs a foreground mask (the MVAE's fourth channel
and the recentring use it). A product or studio photo on a plain backdrop carries its
mask implicitly: the image border is the backdrop, and every pixel that differs from the
border colour is the object. Anything more (cluttered scenes, shadows on textured
floors) needs a real segmentation model, so this module refuses such images with an error
that says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from scipy import ndimage
from torch import Tensor

from .common import MaskNeeded

# Width of the image border, as a fraction of the shorter side, that defines the backdrop.
BORDER_FRACTION = 0.03
# Largest fraction of border pixels allowed to differ from the backdrop colour: an object
# may touch the frame a little, but a border that is mostly not one colour is no backdrop.
MAX_BORDER_OUTLIERS = 0.15
# Connected foreground pieces smaller than this fraction of the image are noise.
MIN_PIECE_FRACTION = 0.001
# A mask whose border is at least this much foreground is almost surely inverted.
INVERTED_BORDER_FRACTION = 0.9
# ... counting a border pixel as foreground only when it is at least this sure: an inverted mask
# is as sure of its border as the mask it inverts, while an average of disagreeing estimates
# (an untrained model's views, averaged over noise draws) hovers near 0.5 there.
INVERTED_BORDER_LEVEL = 0.9


def border_pixels(images: Tensor, width: int) -> Tensor:
    """The pixels of a ``width``-pixel frame around each image: (n, c, H, W) -> (n, p, c)."""
    if width < 1 or 2 * width >= min(images.shape[-2:]):
        raise ValueError(f"border width {width} does not fit images of size {tuple(images.shape[-2:])}.")
    frame = torch.ones(images.shape[-2:], dtype=torch.bool, device=images.device)
    frame[width:-width, width:-width] = False
    return rearrange(images[..., frame], "n c p -> n p c")


def border_width(height: int, width: int) -> int:
    return max(1, round(BORDER_FRACTION * min(height, width)))


def estimate_background(images: Tensor) -> Tensor:
    """Backdrop colour per image, the per-channel median of its border: (n, 3, H, W) -> (n, 3)."""
    border = border_pixels(images, border_width(*images.shape[-2:]))  # n p 3
    return border.median(dim=1).values


def segment_uniform_background(
    images: Tensor, *, tolerance: float = 0.1, view_numbers: Sequence[int] | None = None
) -> Tensor:
    """Masks of objects photographed on a plain, uniformly coloured backdrop.

    A pixel is foreground when any channel differs from the backdrop colour (the median
    of the image border) by more than ``tolerance``; holes inside the object are filled
    and specks smaller than ``MIN_PIECE_FRACTION`` of the image are dropped.

    Args:
        images: (n, 3, H, W) RGB in [0, 1].
        tolerance: colour distance (max over channels, in [0, 1] units) that separates the
            object from the backdrop; raise it for noisy or gradient backdrops.
        view_numbers: the caller's number of each image, for error messages (default 0..n-1).
    Returns:
        (n, 1, H, W) float masks in {0, 1}, 1 = object.
    Raises:
        ValueError when a border is not a uniform colour or nothing stands out from it.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (n, 3, H, W) RGB.")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance={tolerance}; allowed 0 < tolerance < 1 (a colour distance in [0, 1] units).")
    images = images.float()
    background = estimate_background(images)  # n 3
    distance = (images - background[:, :, None, None]).abs().amax(dim=1)  # n h w
    outliers = _border_outlier_fraction(distance, tolerance)
    masks = []
    numbers = list(range(len(images))) if view_numbers is None else list(view_numbers)
    for i, dist, outlier in zip(numbers, distance, outliers, strict=True):
        if outlier > MAX_BORDER_OUTLIERS:
            raise MaskNeeded(
                f"view {i}: {outlier:.0%} of its border differs from the border's median colour, so it is not "
                "a plain backdrop and the object cannot be cut out by colour. Add a background-removal node "
                "and connect its MASK, or use an image with an alpha channel."
            )
        masks.append(_clean(dist.cpu().numpy() > tolerance))
        if not masks[-1].any():
            raise MaskNeeded(
                f"view {i}: no pixel differs from the backdrop colour by more than tolerance={tolerance}; "
                "lower the tolerance, or add a background-removal node and connect its MASK."
            )
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(images.device)


def _border_outlier_fraction(distance: Tensor, tolerance: float) -> Tensor:
    """Fraction of each image's border pixels farther than ``tolerance`` from the backdrop: (n,)."""
    border = border_pixels(distance[:, None], border_width(*distance.shape[-2:]))  # n p 1
    return (border[..., 0] > tolerance).float().mean(dim=1)


def _clean(foreground: np.ndarray) -> np.ndarray:
    """Fill holes (object colours that match the backdrop) and drop tiny specks (noise)."""
    filled = ndimage.binary_fill_holes(foreground)
    labels, count = ndimage.label(filled)
    if count == 0:
        return filled
    sizes = ndimage.sum(filled, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= MIN_PIECE_FRACTION * filled.size) + 1
    return np.isin(labels, keep)


def border_foreground_fraction(masks: Tensor, level: float = 0.5) -> Tensor:
    """Fraction of each mask's border that is foreground (> ``level``): (n, 1, H, W) or (n, H, W) -> (n,).

    An object photo's border is backdrop, so a mask whose border is almost all foreground
    is very likely inverted (1 = background): the caller can say so instead of failing later.
    """
    if masks.ndim == 3:
        masks = masks[:, None]
    border = border_pixels(masks.float(), border_width(*masks.shape[-2:]))  # n p 1
    return (border[..., 0] > level).float().mean(dim=1)


def inverted_views(masks: Tensor) -> list[int]:
    """Indices of masks (n, 1, H, W) or (n, H, W) that look inverted (1 = background).

    A view of an object (a photo or a rig view) has backdrop at its border, so a mask whose
    border is almost all foreground while some pixel inside is background is the complement
    of an object mask. A mask that is foreground everywhere outlines nothing and is not
    counted here (it is blank, not inverted), nor is one whose border is only undecided (values
    between 0.5 and ``INVERTED_BORDER_LEVEL``, as where averaged estimates disagree).
    """
    flat = masks.flatten(1).float()
    has_background = flat.amin(dim=1) < 0.5
    border_is_object = border_foreground_fraction(masks, INVERTED_BORDER_LEVEL) >= INVERTED_BORDER_FRACTION
    return (border_is_object & has_background).nonzero().flatten().tolist()
