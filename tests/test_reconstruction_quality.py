"""The quality path (NeuS-style SDF fit) recovers hollows that carving closes.

The hollow tests are slow (~1 min each on an idle 2-core CPU, several times that when the
CPU is shared); the grad-mode and carve-only tests use a few iterations and take seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_reconstruction import render_rig

from mvdpp_core.reconstruction import SDFConfig, chamfer_distance, reconstruct, shapes, volume_iou

TINY = SDFConfig(iterations=4, rays=256, samples=16, image_size=32, grid_cells=32, device="cpu")


@pytest.fixture(scope="module")
def small_cup() -> tuple[torch.Tensor, torch.Tensor]:
    return render_rig(shapes.patterned(shapes.cup()), size=48)


def test_quality_runs_under_inference_mode(small_cup) -> None:
    """Issue 15: ComfyUI runs nodes under torch.inference_mode(); the SDF fit needs autograd
    and used to fail at loss.backward(). It must give the same mesh as outside it, and
    leave the caller's mode as it was."""
    views, masks = small_cup
    expected = reconstruct(views, masks, method="quality", resolution=32, sdf_config=TINY)
    with torch.inference_mode():
        v, m = views.clone(), masks.clone()  # inference tensors, as ComfyUI's are
        got = reconstruct(v, m, method="quality", resolution=32, sdf_config=TINY)
        assert torch.is_inference_mode_enabled()
    with torch.no_grad():
        also = reconstruct(views, masks, method="quality", resolution=32, sdf_config=TINY)
    assert np.allclose(got.vertices, expected.vertices) and np.array_equal(got.faces, expected.faces)
    assert np.allclose(also.vertices, expected.vertices)


def test_carve_only_quality_only_removes_volume(small_cup) -> None:
    """carve_only=True: the quality mesh lies inside the fast one (up to smoothing), and the
    progress callback counts every SDF iteration."""
    views, masks = small_cup
    steps: list[int] = []
    fast = reconstruct(views, masks, resolution=32).to_trimesh()
    config = TINY.with_overrides(carve_only=True)
    quality = reconstruct(
        views, masks, method="quality", resolution=32, sdf_config=config, callback=lambda s, t: steps.append(t)
    ).to_trimesh()
    assert quality.volume <= fast.volume * 1.01
    assert steps and steps[-1] == 4 + TINY.iterations


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


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 14: the quality path does not recover a cup's hollow yet", strict=False)
def test_quality_recovers_a_cup() -> None:
    """A patterned cup: carving fills it (the hollow is inside every silhouette). Measured
    with carve_only=True (before its opening step): IoU fast 0.299 -> quality 0.286, Chamfer
    0.0285 -> 0.0312; the default full-SDF extraction was not measured on it (the shared
    CPU took ~18 min per fit). Non-strict, so a fix shows as XPASS."""
    mesh = shapes.patterned(shapes.cup())
    views, masks = render_rig(mesh, size=64)
    fast = reconstruct(views, masks, method="fast", resolution=64).to_trimesh()
    config = SDFConfig(iterations=150, image_size=64)
    quality = reconstruct(views, masks, method="quality", resolution=64, sdf_config=config).to_trimesh()
    assert fast.volume > 1.8 * mesh.volume  # fast fills the hollow
    assert volume_iou(quality, mesh) > volume_iou(fast, mesh) + 0.10
    assert chamfer_distance(quality, mesh) < 0.8 * chamfer_distance(fast, mesh)
