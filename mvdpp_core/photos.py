"""Photo files -> condition views, for the demo and batch generation (ComfyUI's LoadImage does this in the graph).

A file is read as it is displayed: its EXIF orientation applied (phone photos store the
pixels sideways and say so in a tag), 16-bit greyscale scaled rather than clipped, a palette's
transparency kept as alpha. Each photo is then framed on its own, so photos of different sizes
and aspect ratios keep their shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .condition import ConditionViews, check_view_count, frame_condition

# Greyscale modes Pillow gives 16-bit PNGs and TIFFs; their values span 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_photo(path: Path | str) -> Tensor:
    """(1, 3, H, W) RGB, or (1, 4, H, W) RGBA when the file has transparency, in [0, 1], upright."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as opened:
            picture = ImageOps.exif_transpose(opened)
            picture.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err}); give a PNG, JPG, WebP or BMP file.") from None
    if picture.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(picture, dtype=np.float32) / 65535
        array = np.repeat(grey.clip(0, 1)[..., None], 3, axis=-1)
    elif picture.mode == "F":
        raise ValueError(f"{path}: a floating-point image (mode F) has no agreed range; save it as an 8-bit PNG.")
    elif picture.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in picture.info:
        array = np.asarray(picture.convert("RGBA"), dtype=np.float32) / 255
    else:
        array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]


def frame_photos(
    paths: Sequence[Path | str], *, size: int, background_tolerance: float = 0.1
) -> ConditionViews:
    """1-10 photo files of one object (the first defines azimuth 0) framed like the training renders.

    Each file is framed on its own (alpha, else its plain backdrop cut out), so sizes and aspect
    ratios may differ; an error names the file it is about.
    """
    check_view_count(len(paths))
    framed = []
    for path in paths:
        photo = read_photo(path)
        try:
            framed.append(frame_condition(photo, size=size, background_tolerance=background_tolerance))
        except ValueError as err:
            hint = " (an RGBA PNG whose alpha marks the object needs no backdrop)" if photo.shape[1] == 3 else ""
            raise ValueError(f"{path}: {str(err).removeprefix('view 0: ')}{hint}") from None
    return ConditionViews(torch.cat([v.images for v in framed]), torch.cat([v.masks for v in framed]))
