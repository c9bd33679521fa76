"""The fixed camera rig of MVDiffusion++ (DESIGN section 3) and pinhole projection.

Conventions, in one place:

* World: right-handed, +Z up (Blender / Objaverse). Objects are centred on their
  bounding-box centre and scaled so the longest side is 1 (they fit in [-0.5, 0.5]^3).
* Rig: 4 elevations x 8 azimuths = 32 target views, index ``i = e * 8 + a``
  (elevation-major). Camera centre ``r * (cos el cos az, cos el sin az, sin el)``, looking
  at the origin, image "up" is the projection of +Z, r = 1.5.
* Cameras are stored camera-to-world (``c2w``, 4x4) in the OpenCV convention: camera x
  right, y down, z forward. To get OpenGL / Blender cameras (x right, y up, z backward),
  right-multiply by ``diag(1, -1, -1, 1)``: ``c2w_gl = c2w_cv @ OPENCV_TO_OPENGL``.
* Intrinsics: square pixels, horizontal = vertical FOV 60 deg, principal point at the image
  centre ``(W / 2, H / 2)`` with pixel *centres* at integer + 0.5 (pixel (0, 0) covers
  [0, 1] x [0, 1]). ``pixel = K @ x_cam / z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import kornia.geometry.conversions as kconv
import kornia.geometry.linalg as klinalg
import torch
from torch import Tensor

ELEVATIONS_DEG: tuple[float, ...] = (-30.0, 0.0, 30.0, 60.0)
AZIMUTHS_DEG: tuple[float, ...] = tuple(45.0 * a for a in range(8))
NUM_TARGET_VIEWS = len(ELEVATIONS_DEG) * len(AZIMUTHS_DEG)  # 32
MAX_CONDITION_VIEWS = 10
NUM_VIEW_SLOTS = NUM_TARGET_VIEWS + MAX_CONDITION_VIEWS  # 42 view-index embeddings
TARGET_DISTANCE = 1.5
FOV_DEG = 60.0
# Training condition views (DESIGN section 3).
CONDITION_ELEVATION_RANGE_DEG = (-10.0, 45.0)
CONDITION_DISTANCE_RANGE = (1.5, 2.2)

OPENCV_TO_OPENGL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


@dataclass(frozen=True)
class RigView:
    """One camera of the rig, in degrees and world units."""

    azimuth_deg: float
    elevation_deg: float
    distance: float = TARGET_DISTANCE


def rig_views() -> list[RigView]:
    """The 32 target views in index order ``i = e * 8 + a``."""
    return [RigView(az, el) for el in ELEVATIONS_DEG for az in AZIMUTHS_DEG]


def view_index(elevation_idx: int, azimuth_idx: int) -> int:
    """Rig index of (elevation row, azimuth column)."""
    return elevation_idx * len(AZIMUTHS_DEG) + azimuth_idx


def mirrored_view_order() -> list[int]:
    """The rig slot that shows each view's mirror image. Reflecting the world across the
    vertical plane through the azimuth-0 camera (the first input view's) moves the camera at
    azimuth a to -a at the same elevation, and its image becomes the left-right flip:
    ``views[mirrored_view_order()].flip(-1)`` are the 32 views of the mirrored object. Applying
    it twice is the identity."""
    n = len(AZIMUTHS_DEG)
    return [view_index(e, (n - a) % n) for e in range(len(ELEVATIONS_DEG)) for a in range(n)]


def rotated_view_order(shift: int) -> list[int]:
    """The rig slot whose view each slot takes when the frame turns by ``shift`` azimuth steps
    (45 deg each) about the vertical axis: views generated with a view at rig azimuth
    ``shift`` as the first (azimuth-0) input are ``views[rotated_view_order(shift)]`` in the
    original first input's frame (slot a there is slot a - shift in theirs). Rotating by
    ``shift`` and then ``-shift`` is the identity."""
    n = len(AZIMUTHS_DEG)
    return [view_index(e, (a - shift) % n) for e in range(len(ELEVATIONS_DEG)) for a in range(n)]


def camera_centers(azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor) -> Tensor:
    """Camera centres ``r (cos el cos az, cos el sin az, sin el)``; inputs (n,), output (n, 3)."""
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return distance[:, None] * torch.stack(
        (torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)), dim=-1
    )


def look_at_c2w(centers: Tensor) -> Tensor:
    """OpenCV camera-to-world matrices (n, 4, 4) for cameras at ``centers`` (n, 3) looking
    at the origin with +Z up."""
    forward = torch.nn.functional.normalize(-centers, dim=-1)  # camera +z
    up = torch.zeros_like(centers)
    up[:, 2] = 1.0
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)  # camera +x
    down = torch.cross(forward, right, dim=-1)  # camera +y
    c2w = torch.eye(4, dtype=centers.dtype, device=centers.device).repeat(len(centers), 1, 1)
    c2w[:, :3, :3] = torch.stack((right, down, forward), dim=-1)
    c2w[:, :3, 3] = centers
    return c2w


def spherical_c2w(
    azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor | float = TARGET_DISTANCE
) -> Tensor:
    """OpenCV camera-to-world (n, 4, 4) for spherical camera positions (degrees)."""
    azimuth_deg = torch.as_tensor(azimuth_deg, dtype=torch.float64).reshape(-1)
    elevation_deg = torch.as_tensor(elevation_deg, dtype=torch.float64).reshape(-1)
    distance = torch.as_tensor(distance, dtype=torch.float64).reshape(-1).expand_as(azimuth_deg)
    if elevation_deg.abs().max() >= 90.0:
        raise ValueError(
            f"elevation {elevation_deg.abs().max().item()} deg is at a pole, where 'up = +Z' "
            "leaves the camera roll undefined; use |elevation| < 90."
        )
    return look_at_c2w(camera_centers(azimuth_deg, elevation_deg, distance))


def rig_c2w(dtype: torch.dtype = torch.float32) -> Tensor:
    """Camera-to-world matrices of the 32 target views, (32, 4, 4), OpenCV convention."""
    views = rig_views()
    c2w = spherical_c2w(
        torch.tensor([v.azimuth_deg for v in views]),
        torch.tensor([v.elevation_deg for v in views]),
        TARGET_DISTANCE,
    )
    return c2w.to(dtype)


def intrinsics(width: int, height: int | None = None, fov_deg: float = FOV_DEG) -> Tensor:
    """Pinhole matrix K (3, 3), square pixels, the FOV spanning the image width (= height)."""
    height = width if height is None else height
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive.")
    focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor(
        [[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64
    )


def resized_intrinsics(K: Tensor, size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Intrinsics (..., 3, 3) of images resized from ``size`` (width, height) to ``new_size``,
    as float64: the first row scales with the width, the second with the height."""
    K = K.double().clone()
    K[..., 0, :] *= new_size[0] / size[0]
    K[..., 1, :] *= new_size[1] / size[1]
    return K


def world_to_camera(points: Tensor, c2w: Tensor) -> Tensor:
    """Points (..., n, 3) in world frame to the frames of cameras c2w (v, 4, 4): (v, n, 3)."""
    w2c = torch.linalg.inv(c2w.to(points.dtype))
    return klinalg.transform_points(w2c, points.expand(len(c2w), -1, -1))


def project(points: Tensor, c2w: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points (n, 3) into v cameras.

    Returns pixel coordinates (v, n, 2) (x right, y down, pixel centres at +0.5) and
    depth along the optical axis (v, n). Points behind a camera get depth <= 0.
    """
    cam = world_to_camera(points[None], c2w)  # v n 3
    depth = cam[..., 2]
    pix = kconv.convert_points_from_homogeneous(cam @ K.to(cam.dtype).T)  # v n 2
    return pix, depth


def pixel_rays(c2w: Tensor, K: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions through every pixel centre.

    Returns origins (v, h, w, 3) and directions (v, h, w, 3) in world frame.
    """
    dtype = c2w.dtype
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype) + 0.5, torch.arange(width, dtype=dtype) + 0.5, indexing="ij"
    )
    pix = torch.stack((xs, ys, torch.ones_like(xs)), dim=-1)  # h w 3
    dirs_cam = pix @ torch.linalg.inv(K.to(dtype)).T  # h w 3, z = 1
    dirs = torch.einsum("vij,hwj->vhwi", c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


@dataclass(frozen=True)
class ConditionCamera:
    """A sampled training condition view: rig azimuth, free elevation and distance."""

    azimuth_deg: float
    elevation_deg: float
    distance: float


def sample_condition_cameras(n: int, generator: torch.Generator | None = None) -> list[ConditionCamera]:
    """Sample n training condition views (DESIGN section 3): azimuth one of the 8 rig
    azimuths, elevation uniform in [-10, 45] deg, distance uniform in [1.5, 2.2].

    The first view is always at azimuth 0: it defines the rig's azimuth origin, exactly as
    the first input image does at inference.
    """
    if not 1 <= n <= MAX_CONDITION_VIEWS:
        raise ValueError(f"n={n} condition views; allowed 1..{MAX_CONDITION_VIEWS}.")
    az_idx = torch.randint(len(AZIMUTHS_DEG), (n,), generator=generator)
    az_idx[0] = 0
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    (el_lo, el_hi), (d_lo, d_hi) = CONDITION_ELEVATION_RANGE_DEG, CONDITION_DISTANCE_RANGE
    return [
        ConditionCamera(AZIMUTHS_DEG[int(a)], el_lo + (el_hi - el_lo) * float(ue), d_lo + (d_hi - d_lo) * float(ud))
        for a, (ue, ud) in zip(az_idx, u, strict=False)
    ]
