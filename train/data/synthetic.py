"""Tiny synthetic objects (unions of coloured boxes), ray-cast exactly through our camera
model and written in the object-folder format: test data and the e2e fallback when no
Blender is available. Not a training data set (the procedural-object renderer is separate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mvdpp_core import cameras as cam

from . import format as fmt
from .plan import camera_plan

_LIGHT = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)


@dataclass(frozen=True)
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    colour: tuple[float, float, float]


def ray_box(origins: Tensor, dirs: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Slab test: entry distance (..., ) (inf on a miss) and the entry face normal (..., 3)."""
    inv = 1.0 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (lo - origins) * inv, (hi - origins) * inv
    t_near, t_far = torch.minimum(t0, t1), torch.maximum(t0, t1)
    t_enter, axis = t_near.max(dim=-1)
    t_exit = t_far.min(dim=-1).values
    hit = (t_enter <= t_exit) & (t_exit > 0)
    normal = torch.zeros_like(dirs).scatter_(-1, axis[..., None], 1.0)
    normal = normal * -torch.sign(dirs)  # facing the camera
    return torch.where(hit, t_enter, torch.full_like(t_enter, torch.inf)), normal


def render_boxes(boxes: list[Box], c2w: Tensor, K: Tensor, size: int) -> np.ndarray:
    """RGBA uint8 (v, size, size, 4) of the boxes seen by cameras c2w (v, 4, 4), Lambert-ish shading."""
    origins, dirs = cam.pixel_rays(c2w.double(), K, size, size)  # v h w 3
    depth = torch.full(dirs.shape[:-1], torch.inf, dtype=torch.float64)
    rgb = torch.ones(*dirs.shape[:-1], 3, dtype=torch.float64)
    for box in boxes:
        t, normal = ray_box(origins, dirs, torch.tensor(box.lo).double(), torch.tensor(box.hi).double())
        closer = t < depth
        shade = 0.55 + 0.45 * (normal @ _LIGHT).abs()  # v h w
        colour = torch.tensor(box.colour, dtype=torch.float64) * shade[..., None]
        rgb = torch.where(closer[..., None], colour, rgb)
        depth = torch.where(closer, t, depth)
    alpha = torch.isfinite(depth).double()[..., None]
    rgba = torch.cat([rgb * alpha, alpha], dim=-1)  # v h w 4
    return (rgba.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def random_boxes(generator: torch.Generator, max_boxes: int = 3) -> list[Box]:
    """1..max_boxes random boxes, then normalised: bbox centre at the origin, longest side 1."""
    n = int(torch.randint(1, max_boxes + 1, (1,), generator=generator))
    centres = torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5
    halves = 0.1 + 0.4 * torch.rand(n, 3, generator=generator, dtype=torch.float64)
    colours = 0.15 + 0.8 * torch.rand(n, 3, generator=generator, dtype=torch.float64)
    lo, hi = centres - halves, centres + halves
    centre = (lo.min(0).values + hi.max(0).values) / 2
    scale = 1.0 / (hi.max(0).values - lo.min(0).values).max()
    lo, hi = (lo - centre) * scale, (hi - centre) * scale
    return [Box(tuple(lo[i].tolist()), tuple(hi[i].tolist()), tuple(colours[i].tolist())) for i in range(n)]


def synthetic_object(seed: int, image_size: int, num_cond: int = 4) -> tuple[np.ndarray, np.ndarray, dict]:
    """Targets (32, S, S, 4), conditions (num_cond, S, S, 4) and the cameras document of one object."""
    generator = torch.Generator().manual_seed(seed)
    boxes = random_boxes(generator)
    plan = camera_plan(image_size, num_cond, seed)
    K = torch.tensor(plan["K"], dtype=torch.float64)
    views = plan["targets"] + plan["conditions"]
    rgba = render_boxes(boxes, torch.tensor([v["c2w"] for v in views], dtype=torch.float64), K, image_size)
    plan = {**plan, "renderer": "mvdpp synthetic boxes", "source": f"boxes seed={seed}"}
    return rgba[: fmt.NUM_TARGETS], rgba[fmt.NUM_TARGETS :], plan


def write_synthetic_dataset(
    root: str | Path, num_objects: int, image_size: int, num_cond: int = 4, seed: int = 0
) -> list[Path]:
    """Write ``num_objects`` synthetic object folders ``obj_000000``... under ``root``."""
    root = Path(root)
    folders = []
    for i in range(num_objects):
        targets, conds, cameras = synthetic_object(seed * 100_003 + i, image_size, num_cond)
        folders.append(fmt.write_object_folder(root / f"obj_{i:06d}", targets, conds, cameras))
    return folders
