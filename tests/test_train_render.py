"""Blender render of a procedural mesh: every file is written, and the rendered masks agree with
the analytic projection of the mesh through our camera model (pins Blender's camera
convention to ours).

Needs Blender: a ``blender`` binary (on PATH or in $MVDPP_BLENDER), or a Python with the
``bpy`` wheel importable (this interpreter, with $MVDPP_BPY_PATH prepended to its path:
``pip install --target DIR bpy`` keeps bpy's numpy<2 out of the test venv). Skips only
when none of these imports bpy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import format as fmt
from train.data.synthetic import Box, render_boxes
from train.render.plan import camera_plan, write_plan

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "render" / "blender_render.py"
SIZE = 64
# Two boxes in glTF coordinates (Y up), deliberately off-centre and not unit-sized.
GLTF_BOXES = [((0.0, 0.0, 0.0), (2.0, 1.0, 0.6)), ((1.4, 1.0, 0.5), (2.0, 1.6, 1.1))]


def bpy_env() -> dict[str, str]:
    extra = [p for p in (os.environ.get("MVDPP_BPY_PATH"), str(REPO)) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(extra)}


def renderer_command() -> list[str] | None:
    blender = os.environ.get("MVDPP_BLENDER") or shutil.which("blender")
    if blender:
        return [blender, "-b", "--factory-startup", "-P", str(SCRIPT), "--"]
    probe = subprocess.run([sys.executable, "-c", "import bpy"], env=bpy_env(), capture_output=True, timeout=120)
    return [sys.executable, str(SCRIPT)] if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    command = renderer_command()
    if command is None:
        pytest.skip(
            "bpy is not importable and no blender binary found (set MVDPP_BPY_PATH to a "
            "`pip install --target DIR bpy` folder, or MVDPP_BLENDER to a Blender binary)."
        )
    import trimesh

    tmp = tmp_path_factory.mktemp("render")
    meshes = []
    for lo, hi in GLTF_BOXES:
        box = trimesh.creation.box(extents=np.subtract(hi, lo))
        box.apply_translation(np.add(lo, hi) / 2)
        meshes.append(box)
    trimesh.util.concatenate(meshes).export(tmp / "boxes.glb")
    plan = write_plan(tmp / "plan.json", camera_plan(SIZE, num_conditions=2, seed=3))
    out = tmp / "boxes"
    args = [
        "--object",
        str(tmp / "boxes.glb"),
        "--out",
        str(out),
        "--plan",
        str(plan),
        "--samples",
        "4",
        "--threads",
        "2",
    ]
    proc = subprocess.run([*command, *args], env=bpy_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def world_boxes() -> tuple[list[Box], list[float], float]:
    """The boxes in our Z-up world after Blender's glTF import ((x, y, z) -> (x, -z, y)) and
    the normalisation (bbox centre to the origin, longest side 1), plus centre and scale."""
    blender = [((lo[0], -hi[2], lo[1]), (hi[0], -lo[2], hi[1])) for lo, hi in GLTF_BOXES]
    lo_all = np.min([b[0] for b in blender], axis=0)
    hi_all = np.max([b[1] for b in blender], axis=0)
    centre, scale = (lo_all + hi_all) / 2, 1.0 / float(np.max(hi_all - lo_all))
    boxes = [
        Box(tuple((np.array(lo) - centre) * scale), tuple((np.array(hi) - centre) * scale), (1.0, 1.0, 1.0))
        for lo, hi in blender
    ]
    return boxes, centre.tolist(), scale


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_render_writes_every_file_and_the_normalisation(rendered):
    assert fmt.is_complete(rendered)
    doc = json.loads((rendered / "cameras.json").read_text())
    assert [v["file"] for v in doc["targets"]] == [fmt.target_file(i) for i in range(32)]
    assert [v["file"] for v in doc["conditions"]] == [fmt.cond_file(j) for j in range(2)]
    assert doc["conditions"][0]["azimuth_deg"] == 0.0
    _, centre, scale = world_boxes()
    np.testing.assert_allclose(doc["normalization"]["center"], centre, atol=1e-5)
    assert doc["normalization"]["scale"] == pytest.approx(scale, rel=1e-5)
    views = fmt.read_object_folder(rendered)
    assert views.target_rgba.shape == (32, SIZE, SIZE, 4) and views.cond_rgba.shape == (2, SIZE, SIZE, 4)
    assert views.target_rgba[..., 3].min() == 0 and views.target_rgba[..., 3].max() == 255  # transparent film


def test_rendered_masks_match_the_analytic_projection(rendered):
    doc = json.loads((rendered / "cameras.json").read_text())
    views = doc["targets"] + doc["conditions"]
    boxes, _, _ = world_boxes()
    c2w = torch.tensor([v["c2w"] for v in views], dtype=torch.float64)
    analytic = render_boxes(boxes, c2w, torch.tensor(doc["K"], dtype=torch.float64), SIZE)[..., 3] > 127
    rendered_masks = np.stack([np.asarray(Image.open(rendered / v["file"]))[..., 3] > 127 for v in views])
    per_view = [iou(a, r) for a, r in zip(analytic, rendered_masks, strict=True)]
    assert iou(analytic, rendered_masks) >= 0.95 and min(per_view) >= 0.9, per_view
    # The check has teeth: an image flipped upside down (OpenGL vs OpenCV y) does not pass.
    flipped = iou(analytic, rendered_masks[:, ::-1])
    assert flipped < 0.9
