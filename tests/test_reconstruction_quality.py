"""The quality path (NeuS-style SDF fit) recovers the concavity that carving closes.

Slow: ~1-2 min on an idle 2-core CPU (several times that when the CPU is shared).
"""

from __future__ import annotations

import pytest
from test_reconstruction import render_rig

from mvdpp_core.reconstruction import SDFConfig, chamfer_distance, reconstruct, shapes, volume_iou


@pytest.mark.slow
def test_quality_path_beats_fast_path_on_a_bowl() -> None:
    """A patterned bowl (opening up): the carved hull fills it (IoU ~0.18); fitting the SDF
    to the views sinks the lid into the cavity (measured IoU 0.36, Chamfer 0.038 -> 0.022)."""
    mesh = shapes.patterned(shapes.bowl())
    views, masks = render_rig(mesh, size=64)
    fast = reconstruct(views, masks, method="fast", resolution=64).to_trimesh()
    config = SDFConfig(iterations=150, image_size=64)
    quality = reconstruct(views, masks, method="quality", resolution=64, sdf_config=config).to_trimesh()
    iou_fast, iou_quality = volume_iou(fast, mesh), volume_iou(quality, mesh)
    cd_fast, cd_quality = chamfer_distance(fast, mesh), chamfer_distance(quality, mesh)
    assert iou_quality > iou_fast + 0.08, (iou_fast, iou_quality)
    assert cd_quality < 0.8 * cd_fast, (cd_fast, cd_quality)
