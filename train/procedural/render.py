"""Render a procedural object into the rendered-object folder format (``train/data/format.py``).

The cameras come from ``train.data.plan.camera_plan``, the same plan the Blender pipeline
renders, so a folder written here and one written by Blender differ only in their pixels.
Lighting approximates the Blender script's uniform, shadowless world light: mostly ambient
(flat albedo) plus a soft two-sided Lambert term from a fixed world direction, so shapes keep
some shading cue and the light stays consistent across the 32 views.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh

from mvdpp_core.reconstruction.render import render_trimesh

from ..data import format as fmt
from ..data.plan import camera_plan
from .objects import Split, object_seed, parse_split, procedural_object

LIGHT_DIR = (0.35, -0.25, 1.0)  # world direction towards the light (above, slightly front-left)
AMBIENT = 0.7
ANTIALIAS = 2
NUM_CONDITIONS = 4
RENDERER = "mvdpp procedural (PyTorch rasteriser)"


@dataclass
class RenderedObject:
    """targets (32, S, S, 4) and conditions (N, S, S, 4) uint8 RGBA, cameras.json, true mesh."""

    targets: np.ndarray
    conditions: np.ndarray
    cameras: dict
    mesh: trimesh.Trimesh


def render_views(mesh: trimesh.Trimesh, c2w: torch.Tensor, K: torch.Tensor, size: int) -> np.ndarray:
    """(v, S, S, 4) uint8 RGBA: colour composited on white, coverage in alpha."""
    result = render_trimesh(
        mesh, c2w, K, size, background=1.0, light_dir=torch.tensor(LIGHT_DIR), ambient=AMBIENT, antialias=ANTIALIAS
    )
    rgba = torch.cat([result.rgb, result.alpha[..., None]], dim=-1)  # v S S 4
    return (rgba.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def render_object(split: Split | str, index: int, size: int = 64,
                  num_conditions: int = NUM_CONDITIONS) -> RenderedObject:
    """Build and render object ``index`` of ``split``: 32 rig views + ``num_conditions``."""
    split = parse_split(split)
    if size < 16 or size % 8:
        raise ValueError(f"size={size}; use a multiple of 8 of at least 16 (64 for the tiny preset).")
    mesh, center, scale = procedural_object(split, index)
    seed = object_seed(split, index)
    plan = camera_plan(size, num_conditions, seed=seed % 2**62)
    views = plan["targets"] + plan["conditions"]
    c2w = torch.tensor([v["c2w"] for v in views], dtype=torch.float64)  # v 4 4
    rgba = render_views(mesh, c2w, torch.tensor(plan["K"], dtype=torch.float64), size)
    cameras = fmt.cameras_document(
        image_size=size, K=plan["K"], targets=plan["targets"], conditions=plan["conditions"],
        center=center.tolist(), scale=scale, renderer=RENDERER, source=f"procedural {split.value} {index}",
    )
    return RenderedObject(rgba[: fmt.NUM_TARGETS], rgba[fmt.NUM_TARGETS:], cameras, mesh)


def folder_name(split: Split | str, index: int) -> str:
    return f"{parse_split(split).value}_{int(index):07d}"


def write_object(root: str | Path, split: Split | str, index: int, size: int = 64,
                 num_conditions: int = NUM_CONDITIONS, save_mesh: bool = False) -> Path:
    """Render object ``index`` into ``root/<split>_<index>/``; ``mesh.ply`` too with ``save_mesh``."""
    obj = render_object(split, index, size, num_conditions)
    folder = Path(root) / folder_name(split, index)
    folder.mkdir(parents=True, exist_ok=True)
    if save_mesh:  # before cameras.json, which marks the folder complete
        obj.mesh.export(folder / "mesh.ply")
    return fmt.write_object_folder(folder, obj.targets, obj.conditions, obj.cameras)
