"""Validation and framing of condition images: errors that name the value and the fix."""

from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import composite_on_white

# Fraction of the image side that the object's longest mask side fills after recentring.
# A unit object seen at the training distances (1.5-2.2) with FOV 60 fills 0.45-0.65.
DEFAULT_FILL = 0.55
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds (the node's seed range too)
MAX_AVERAGE_SEEDS = 16  # generate's average_seeds (the sampler node's, the demo's and eval's range too)


def as_int(name: str, value: object) -> int:
    """``value`` as a Python int: ints and integer numpy / torch scalars pass, bools, floats
    and strings raise TypeError naming the value and the fix."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    hint = f" (e.g. {name}={int(value)})" if isinstance(value, numbers.Real) and math.isfinite(value) else ""
    raise TypeError(f"{name}={value!r} ({type(value).__name__}) must be an integer{hint}.")


def as_real(name: str, value: object, example: str) -> float:
    """``value`` as a Python float: ints, floats and numpy scalars pass; bools, strings and
    tensors raise TypeError naming the value and an example."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}) must be a number, e.g. {name}={example}.")
    return float(value)


def check_seed(seed: object) -> int:
    seed = as_int("seed", seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} is out of range; allowed 0..2**64-1 (any integer in it, e.g. seed=0).")
    return seed


def check_average_seeds(count: object) -> int:
    """How many noise draws ``generate`` averages: an int in 1..``MAX_AVERAGE_SEEDS``."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_AVERAGE_SEEDS:
        raise ValueError(f"average_seeds={count!r}; allowed 1 to {MAX_AVERAGE_SEEDS} noise draws whose views are "
                         "averaged (1 = no averaging).")
    return count


def average_seeds_error(flag: str, count: int | None) -> str | None:
    """The message for a count of averaged seeds outside 1..MAX_AVERAGE_SEEDS given to ``flag``
    (None when it is fine or not given); the demo, eval_default, train_default and batch
    generation pass it to ``parser.error`` before any work."""
    if count is None or 1 <= count <= MAX_AVERAGE_SEEDS:
        return None
    return f"{flag} {count}: give 1 to {MAX_AVERAGE_SEEDS} noise draws (1 = no averaging)."


def check_guidance(guidance: object) -> float:
    """Classifier-free guidance scale: finite and >= 0 (1 = off; 2-7 are typical)."""
    value = as_real("guidance", guidance, "3.0")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"guidance={value} is not allowed; it must be finite and >= 0 (1 = off, 2 to 7 typical, "
            "the node allows 1 to 20), e.g. guidance=3.0."
        )
    return value


def check_vae_size(height: int, width: int, factor: int) -> None:
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(
            f"image size {height}x{width} cannot go through the VAE, which downsamples by {factor}; "
            f"use sizes that are positive multiples of {factor}."
        )


def recenter(images: Tensor, masks: Tensor, size: int, fill: float = DEFAULT_FILL) -> tuple[Tensor, Tensor]:
    """Crop each view square around its mask's bounding box and resize to ``size``, so the
    object's longest side spans ``fill`` of the image and sits at the centre, on white.

    images (n, 3, H, W), masks (n, 1, H, W) -> (n, 3, size, size), (n, 1, size, size).
    """
    if not 0.1 <= fill <= 1.0:
        raise ValueError(f"fill={fill}; allowed 0.1..1.0 (fraction of the image the object spans).")
    out_images, out_masks = [], []
    for image, mask in zip(images, masks, strict=False):
        ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
        cy = (ys.min() + ys.max() + 1).item() / 2
        cx = (xs.min() + xs.max() + 1).item() / 2
        side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1).item() / fill
        composite = composite_on_white(image, mask)  # on white, the training background
        height, width = image.shape[-2:]
        if side > size:  # shrink with an antialiased filter first; bilinear sampling would alias
            scale = size / side
            composite, mask = (
                F.interpolate(t[None], scale_factor=scale, mode="bilinear", antialias=True)[0]
                for t in (composite, mask)
            )
            sy, sx = mask.shape[-2] / height, mask.shape[-1] / width
            cx, cy, height, width = cx * sx, cy * sy, mask.shape[-2], mask.shape[-1]
            side = side * sx
        theta = _crop_affine(cx, cy, side, width, height).to(image.dtype)
        grid = F.affine_grid(theta[None], [1, 1, size, size], align_corners=False)
        out_images.append(_warp(composite, grid, fill_value=1.0))
        out_masks.append(_warp(mask, grid, fill_value=0.0))
    return torch.stack(out_images).clamp(0, 1), torch.stack(out_masks).clamp(0, 1)


def _warp(image: Tensor, grid: Tensor, fill_value: float) -> Tensor:
    """Bilinear resample (c, H, W) at ``grid``; outside the image reads ``fill_value``."""
    shifted = F.grid_sample(image[None] - fill_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return shifted[0] + fill_value


def _crop_affine(cx: float, cy: float, side: float, width: int, height: int) -> Tensor:
    """Affine theta (2, 3) mapping output [-1, 1] to a square crop of ``side`` pixels centred
    at (cx, cy) in an input of width x height (normalised coords, align_corners=False)."""
    return torch.tensor(
        [[side / width, 0.0, 2 * cx / width - 1], [0.0, side / height, 2 * cy / height - 1]],
        dtype=torch.float64,
    )


def resize(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of (n, c, H, W) to (n, c, size, size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
