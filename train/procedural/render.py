"""Render a procedural object into the rendered-object folder format (``train/data/format.py``).

The cameras come from ``train.data.plan.camera_plan``, the same plan the Blender pipeline
renders, so a folder written here and one written by Blender differ only in their pixels.
Lighting approximates the Blender script's uniform, shadowless world light: mostly ambient
(flat albedo) plus a soft two-sided Lambert term from a fixed world direction, so shapes keep
some shading cue and the light stays consistent across the 32 views.

Views are stored with straight alpha, the PNG convention Blender writes and every reader here
assumes (``train.data.dataset.to_tensors`` composites colour on white through alpha once). Until
2026-12-05 the colour was stored already composited on white, so readers lightened every
antialiased outline twice (``a^2 c + 1 - a^2``); the embedded default (steps 1-5 of the README's
recipe) trained on such views, and ``on_white=True`` (``generate --legacy-on-white``) renders
them again to reproduce it (docs/embedded_default.md, "The views on white").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh

from mvdpp_core.reconstruction.render import RenderResult, render_trimesh

from ..data import format as fmt
from ..data.plan import camera_plan
from .objects import Split, object_seed, parse_split, procedural_object

LIGHT_DIR = (0.35, -0.25, 1.0)  # world direction towards the light (above, slightly front-left)
AMBIENT = 0.7
ANTIALIAS = 2
NUM_CONDITIONS = 4
UPRIGHT = "upright"  # the source suffix of objects whose parts turn about the vertical only
RENDERER = "mvdpp procedural (PyTorch rasteriser, straight alpha)"
LEGACY_RENDERER = "mvdpp procedural (PyTorch rasteriser)"  # colour stored on white (until 2026-12-05)


@dataclass
class RenderedObject:
    """targets (32, S, S, 4) and conditions (N, S, S, 4) uint8 RGBA, cameras.json, true mesh."""

    targets: np.ndarray
    conditions: np.ndarray
    cameras: dict
    mesh: trimesh.Trimesh


def shade(mesh: trimesh.Trimesh, c2w: torch.Tensor, K: torch.Tensor, size: int,
          background: float = 0.0) -> RenderResult:
    """The object under this renderer's light (float, premultiplied unless ``background`` is 1)."""
    return render_trimesh(mesh, c2w, K, size, background=background, light_dir=torch.tensor(LIGHT_DIR),
                          ambient=AMBIENT, antialias=ANTIALIAS)


def render_views(mesh: trimesh.Trimesh, c2w: torch.Tensor, K: torch.Tensor, size: int,
                 on_white: bool = False) -> np.ndarray:
    """(v, S, S, 4) uint8 RGBA with straight alpha: the surface's colour, coverage in alpha
    (white where nothing is covered), so one composite on white gives the render on white.
    ``on_white``: the colour already composited on white (the legacy renderer)."""
    result = shade(mesh, c2w, K, size, background=1.0 if on_white else 0.0)
    rgb, alpha = result.rgb, result.alpha[..., None]  # premultiplied unless on_white
    if not on_white:  # the box filter averaged colour x coverage: divide the coverage out
        rgb = torch.where(alpha > 0, rgb / alpha.clamp(min=1e-12), torch.ones_like(rgb))
    rgba = torch.cat([rgb, alpha], dim=-1)  # v S S 4
    return (rgba.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def render_object(split: Split | str, index: int, size: int = 64, num_conditions: int = NUM_CONDITIONS,
                  on_white: bool = False, upright: bool = False) -> RenderedObject:
    """Build and render object ``index`` of ``split``: 32 rig views + ``num_conditions``
    (``on_white``: colour stored composited on white, the legacy renderer; ``upright``: each
    part turned about the vertical only, ``objects.upright``, same cameras)."""
    split = parse_split(split)
    if size < 16 or size % 8:
        raise ValueError(f"size={size}; use a multiple of 8 of at least 16 (64 for the tiny preset).")
    mesh, center, scale = procedural_object(split, index, upright)
    seed = object_seed(split, index)
    plan = camera_plan(size, num_conditions, seed=seed % 2**62)
    views = plan["targets"] + plan["conditions"]
    c2w = torch.tensor([v["c2w"] for v in views], dtype=torch.float64)  # v 4 4
    rgba = render_views(mesh, c2w, torch.tensor(plan["K"], dtype=torch.float64), size, on_white)
    cameras = fmt.cameras_document(
        image_size=size, K=plan["K"], targets=plan["targets"], conditions=plan["conditions"],
        center=center.tolist(), scale=scale, renderer=LEGACY_RENDERER if on_white else RENDERER,
        source=source_name(split, index, upright),
    )
    return RenderedObject(rgba[: fmt.NUM_TARGETS], rgba[fmt.NUM_TARGETS:], cameras, mesh)


def source_name(split: Split | str, index: int, upright: bool = False) -> str:
    """cameras.json's ``source`` of a procedural object (``upright`` objects say so)."""
    return f"procedural {parse_split(split).value} {int(index)}" + (f" {UPRIGHT}" if upright else "")


def check_renderer(folder: str | Path, on_white: bool = False, upright: bool = False) -> None:
    """Refuse a procedural object folder written by the other renderer (straight or on-white
    colour) or of the other object variant (upright or as generated), so a data set or an
    evaluation never mixes the conventions silently."""
    document = json.loads((Path(folder) / fmt.CAMERAS_FILE).read_text())
    renderer = document.get("renderer", "")
    wanted, other = (LEGACY_RENDERER, RENDERER) if on_white else (RENDERER, LEGACY_RENDERER)
    if renderer == other:
        flag = "without --legacy-on-white" if on_white else "with --legacy-on-white"
        raise ValueError(f"{folder} was rendered by {renderer!r}, not {wanted!r}: use a new folder, "
                         f"or run {flag} to read it.")
    source = str(document.get("source", ""))
    found_upright = source.endswith(f" {UPRIGHT}")
    if source.startswith("procedural ") and found_upright != upright:
        found, flag = ("an upright", "with --upright") if found_upright else ("an as-generated", "without --upright")
        raise ValueError(f"{folder} holds {found} object ({source!r}): use a new folder, or run {flag} to read it.")


def folder_name(split: Split | str, index: int) -> str:
    return f"{parse_split(split).value}_{int(index):07d}"


def write_object(root: str | Path, split: Split | str, index: int, size: int = 64,
                 num_conditions: int = NUM_CONDITIONS, save_mesh: bool = False, on_white: bool = False,
                 upright: bool = False) -> Path:
    """Render object ``index`` into ``root/<split>_<index>/``; ``mesh.ply`` too with ``save_mesh``
    (``on_white``: the legacy renderer's colour; ``upright``: its parts turned about the vertical only)."""
    obj = render_object(split, index, size, num_conditions, on_white, upright)
    folder = Path(root) / folder_name(split, index)
    folder.mkdir(parents=True, exist_ok=True)
    if save_mesh:  # before cameras.json, which marks the folder complete
        obj.mesh.export(folder / "mesh.ply")
    return fmt.write_object_folder(folder, obj.targets, obj.conditions, obj.cameras)
