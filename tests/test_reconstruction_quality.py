"""The quality path (NeuS-style SDF fit, carve-only) recovers hollows that carving closes.

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


def test_quality_only_removes_volume(small_cup) -> None:
    """Carve-only: the quality mesh lies inside the fast one (up to smoothing), and the
    progress callback counts every SDF iteration."""
    views, masks = small_cup
    steps: list[int] = []
    fast = reconstruct(views, masks, resolution=32).to_trimesh()
    quality = reconstruct(
        views, masks, method="quality", resolution=32, sdf_config=TINY, callback=lambda s, t: steps.append(t)
    ).to_trimesh()
    assert quality.volume <= fast.volume * 1.01
    assert steps and steps[-1] == 4 + TINY.iterations


# Issue 14's quality target is not met yet. Measured with carve-only fusion (before the
# opening of the carved region was added): cup IoU fast 0.299 -> quality 0.286, Chamfer
# 0.0285 -> 0.0312 (the lid sinks part way, the walls get pitted). The bowl lifted IoU
# 0.18 -> 0.36 before carve-only fusion and was not re-measured after it (the shared CPU
# ran ~18 min per fit). Non-strict, so a fix shows as XPASS.
HOLLOW_XFAIL = pytest.mark.xfail(reason="issue 14: the quality path does not yet recover hollows reliably", strict=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "build", "min_gain"),
    [
        pytest.param("bowl", shapes.bowl, 0.10, marks=HOLLOW_XFAIL),
        pytest.param("cup", shapes.cup, 0.10, marks=HOLLOW_XFAIL),
    ],
)
def test_quality_recovers_a_hollow_that_fast_fills(name: str, build, min_gain: float) -> None:
    """A patterned bowl and a cup opening upwards: carving fills them (the hollow is inside
    every silhouette), the SDF fit to the colours sinks the lid into them."""
    mesh = shapes.patterned(build())
    views, masks = render_rig(mesh, size=64)
    fast = reconstruct(views, masks, method="fast", resolution=64).to_trimesh()
    config = SDFConfig(iterations=150, image_size=64, device="cpu")
    quality = reconstruct(views, masks, method="quality", resolution=64, sdf_config=config).to_trimesh()
    iou_fast, iou_quality = volume_iou(fast, mesh), volume_iou(quality, mesh)
    cd_fast, cd_quality = chamfer_distance(fast, mesh), chamfer_distance(quality, mesh)
    assert fast.volume > 1.8 * mesh.volume  # fast fills the hollow
    assert iou_quality > iou_fast + min_gain, (iou_fast, iou_quality)
    assert cd_quality < 0.8 * cd_fast, (cd_fast, cd_quality)
