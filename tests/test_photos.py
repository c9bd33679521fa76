"""Photo files as the demo and batch generation read them: upright, in range, framed one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mvdpp_core.photos import frame_photos, read_photo

EXIF_ORIENTATION = 0x0112


def _disc(height: int, width: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    cy, cx = centre or ((height - 1) / 2, (width - 1) / 2)
    y, x = np.mgrid[:height, :width]
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


def _bbox_aspect(mask: torch.Tensor) -> float:
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return float((xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1))


def test_a_photo_is_read_as_displayed_under_its_exif_orientation(tmp_path):
    """Orientation 6 (rotate 90 deg clockwise to display): stored 64 wide x 32 tall with a red
    block at the stored top-left, it displays 32 wide x 64 tall with the block at the top-right."""
    stored = np.full((32, 64, 3), 255, np.uint8)
    stored[:16, :16] = (220, 20, 20)
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[EXIF_ORIENTATION] = 6
    path = tmp_path / "phone.jpg"
    picture.save(path, exif=exif, quality=95)

    photo = read_photo(path)
    assert photo.shape == (1, 3, 64, 32)
    red = (photo[0, 0] > 0.6) & (photo[0, 1] < 0.4)
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert ys.max() < 20 and xs.min() >= 12, "the block must sit at the displayed top-right"


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG of a dark disc on white: clipping to 8 bits would make every pixel white
    and leave nothing to segment."""
    grey = np.full((48, 48), 65535, np.uint16)
    grey[_disc(48, 48, 12)] = 13107  # 0.2
    path = tmp_path / "scan16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")

    photo = read_photo(path)
    assert photo.shape == (1, 3, 48, 48)
    assert photo[0, :, 24, 24] == pytest.approx([0.2, 0.2, 0.2], abs=1e-4)
    assert photo[0, :, 0, 0] == pytest.approx([1.0, 1.0, 1.0])
    views = frame_photos([path], size=64)
    assert 0.2 < float(views.masks.mean()) < 0.3  # a disc spanning 0.55 of the side: pi / 4 * 0.55^2 = 0.24


def test_a_palette_picture_keeps_its_transparency(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[_disc(32, 32, 8)] = (30, 160, 40, 255)
    path = tmp_path / "palette.png"
    Image.fromarray(rgba).convert("P").save(path, transparency=0)
    picture = Image.open(path)
    assert picture.mode == "P" and "transparency" in picture.info

    photo = read_photo(path)
    assert photo.shape == (1, 4, 32, 32)
    assert torch.equal(photo[0, 3] > 0.5, torch.from_numpy(_disc(32, 32, 8)))


def test_photos_of_different_aspect_ratios_keep_their_shapes(tmp_path):
    """A round object in a square photo and in a wide one: each framed on its own stays round
    (squeezing the second to the first's size would make it an ellipse twice as tall as wide)."""
    paths = []
    for name, (height, width) in {"square": (64, 64), "wide": (48, 96)}.items():
        rgba = np.zeros((height, width, 4), np.uint8)
        rgba[_disc(height, width, 14)] = (200, 120, 30, 255)
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(rgba).save(paths[-1])

    views = frame_photos(paths, size=64)
    assert views.images.shape == (2, 3, 64, 64) and views.masks.shape == (2, 1, 64, 64)
    for mask in views.masks[:, 0]:
        assert _bbox_aspect(mask) == pytest.approx(1.0, abs=0.1)
    assert torch.mean((views.masks[0] - views.masks[1]).abs()) < 0.02


def test_errors_name_the_file(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(blank)
    with pytest.raises(ValueError, match=r"blank\.png: no pixel differs from the backdrop.*an RGBA PNG whose alpha"):
        frame_photos([blank], size=64)

    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image .*give a PNG, JPG"):
        read_photo(broken)

    with pytest.raises(ValueError, match="11 condition views given; the model takes 1 to 10"):
        frame_photos([blank] * 11, size=64)
