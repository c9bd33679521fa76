"""The flow diagnostics of train/diagnostics.py measure what they claim: silhouette consistency
separates one object's views from views of different objects, the consensus hull outvotes a
few wrong masks, the single-view hull contains its object and reproduces its view, and the
attention recorder reads exactly the uniform share from attention that cannot tell keys apart,
the condition and sibling shares are exactly 0 where no information can cross views, and the
placement of a mask (size, position) is told apart from its shape, and the mesh's volume
ratio follows the size its views give it."""

import math

import pytest
import torch
from tiny_models import tiny_model

from mvdpp_core.model import Condition
from train.data.dataset import to_tensors
from train.diagnostics import (
    SIBLING_PROBE_VIEWS,
    attention_flow,
    best_common_scale,
    condition_share,
    foreground_colour,
    hull_masks,
    mask_iou,
    mask_placement,
    mesh_errors,
    noisy_targets,
    per_view_iou,
    sibling_share,
    silhouette_consistency,
    single_view_hull,
)
from train.procedural.render import render_object


def _rig_masks(index: int) -> torch.Tensor:
    return to_tensors(render_object("heldout", index, size=64).targets, 64)[1][:, 0]  # 32 64 64


def test_silhouette_consistency_of_true_views_is_high_and_of_mixed_objects_low():
    masks = [_rig_masks(i) for i in range(3)]
    assert silhouette_consistency(masks[0]) > 0.95
    mixed = torch.stack([masks[v % 3][v] for v in range(32)])  # each view from another object
    assert silhouette_consistency(mixed) < 0.75
    blobs = masks[0].roll(shifts=9, dims=0)  # right masks, wrong rig slots
    assert silhouette_consistency(blobs) < silhouette_consistency(masks[0]) - 0.2


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


def test_consensus_hull_outvotes_a_few_wrong_masks():
    truth, other = _rig_masks(0), _rig_masks(1)
    assert _iou(hull_masks(truth), truth > 0.5) > 0.95  # the exact hull of true views reprojects onto them
    wrong = truth.clone()
    wrong[[3, 20]] = other[[3, 20]]  # two views show another object
    assert _iou(hull_masks(wrong), truth > 0.5) < 0.85  # the exact hull loses what either wrong view misses
    assert _iou(hull_masks(wrong, max_dissent=2), truth > 0.5) > 0.93  # letting each voxel ignore 2 views does not


def test_single_view_hull_contains_the_object_and_reproduces_its_view():
    rendered = render_object("heldout", 2, size=64)
    rgb, masks = to_tensors(rendered.targets, 64)
    K = torch.tensor(rendered.cameras["K"])
    front = torch.tensor(rendered.cameras["targets"][8]["c2w"])  # rig view 8 as the input, with its camera
    images, hull = single_view_hull(rgb[8], masks[8], front, K)
    inside, truth = hull[:, 0] > 0.5, masks[:, 0] > 0.5
    assert (inside & truth).sum() / truth.sum() > 0.99  # every view of the object lies inside the hull
    assert _iou(inside[8], truth[8]) > 0.999  # and the input's own view comes back, to the pixel (measured 1.0;
    on = truth[8] & inside[8]  # sampling the mask half a pixel off, align_corners=True, gives 0.992)
    assert (images[8][:, on] - rgb[8][:, on]).abs().mean() < 1e-3  # with its colours (measured 5e-8)
    assert silhouette_consistency(hull[:, 0]) > 0.97  # one 3D object by construction
    cond = to_tensors(rendered.conditions, 64)
    elevated = torch.tensor(rendered.cameras["conditions"][0]["c2w"])
    _, hull = single_view_hull(cond[0][0], cond[1][0], elevated, K)  # a condition view at its own pose
    assert (hull[:, 0] > 0.5)[truth].float().mean() > 0.99
    wrong_pose = torch.tensor(rendered.cameras["targets"][10]["c2w"])  # the same view, told it is at azimuth 90
    _, hull = single_view_hull(rgb[8], masks[8], wrong_pose, K)
    assert _iou(hull[8, 0] > 0.5, truth[8]) < 0.8  # the input's view is not reproduced from the wrong camera


@torch.no_grad()
def test_attention_recorder_reads_the_uniform_share_from_blind_attention():
    model = tiny_model(0, view_scale=0.5)
    for name, param in model.unet.named_parameters():  # queries and keys all zero: uniform attention
        if "attn1.to_q" in name or "attn1.to_k" in name:
            param.zero_()
    g = torch.Generator().manual_seed(0)
    objects = [
        (
            torch.randn(1, 34, 4, 16, 16, generator=g),
            Condition(torch.randn(1, 2, 4, 16, 16, generator=g), torch.randn(1, 2, 32, generator=g)),
        )
    ]
    flow = attention_flow(model, objects, 900)
    assert len(flow) == 4  # the tiny UNet's global attention layers
    for layer in flow:
        assert abs(layer["cond_mass"] - 2 / 34) < 1e-5 and abs(layer["uniform_mass"] - 2 / 34) < 1e-9
        assert abs(layer["own_view_mass"] - 1 / 34) < 1e-5
        assert abs(layer["entropy"] - 1.0) < 1e-4


@torch.no_grad()
def test_condition_share_is_exactly_zero_when_the_condition_cannot_matter():
    model = tiny_model(0, view_scale=0.5)
    model.unet.set_attention_backend("sdpa", global_attention=False)  # targets never see the condition views
    g = torch.Generator().manual_seed(1)
    objects = [
        (
            torch.randn(1, 33, 4, 16, 16, generator=g),
            Condition(torch.randn(1, 1, 4, 16, 16, generator=g), torch.zeros(1, 1, 32)),
        )
        for _ in range(2)
    ]
    assert condition_share(model, objects, 500)["share"] == 0.0  # bit-identical target outputs
    model.unet.set_attention_backend("sdpa", global_attention=True)
    assert abs(condition_share(model, objects, 500)["share"]) > 1e-7  # small: untrained attention is near uniform


@torch.no_grad()
def test_sibling_share_is_exactly_zero_where_views_cannot_be_read_and_measures_the_probe_view():
    model = tiny_model(0, view_scale=0.5)
    g = torch.Generator().manual_seed(2)
    objects = [
        (
            torch.randn(1, 33, 4, 16, 16, generator=g),
            Condition(torch.randn(1, 1, 4, 16, 16, generator=g), torch.randn(1, 1, 32, generator=g)),
        )
        for _ in range(2)
    ]
    shared = sibling_share(model, objects, 900, 300)
    # the "others high" error is the probe views' x0 error under the usual joint noise
    errors = []
    for i, (x0, cond) in enumerate(objects):
        noisy, tt = noisy_targets(model, x0, 900, seed=i)
        pred = model.schedule.predict_x0(model.predict(noisy, tt.float(), cond, model.empty_latent(1)), noisy, tt)
        errors.append((pred - x0)[:, list(SIBLING_PROBE_VIEWS)].pow(2).mean().item())
    assert abs(shared["x0_err_others_high"] - sum(errors) / len(errors)) < 1e-6 * shared["x0_err_others_high"]
    assert abs(shared["share"]) > 1e-7  # global attention: the others' noise level reaches the probe view
    assert sibling_share(model, objects, 900, 900)["share"] == 0.0  # the two passes are the same pass
    model.unet.set_attention_backend("sdpa", global_attention=False)
    assert sibling_share(model, objects, 900, 300)["share"] == 0.0  # bit-identical probe-view outputs
    assert sibling_share(model, objects, 900, 300, null=True)["share"] == 0.0  # also without the condition


def _disk(size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(*[torch.arange(size, dtype=torch.float64)] * 2, indexing="ij")
    return ((xs - cx) ** 2 + (ys - cy) ** 2 <= r**2).double()


def test_mask_placement_separates_size_and_position_from_shape():
    true = _disk(64, 30.0, 34.0, 12.0)
    # the same disk, 1.25x as wide and moved by (6, -5): placement alone
    pred = _disk(64, 36.0, 29.0, 15.0)
    raw = float(((pred > 0.5) & (true > 0.5)).sum() / ((pred > 0.5) | (true > 0.5)).sum())
    got = mask_placement(pred, true)
    assert got["area_ratio"] == float(pred.sum() / true.sum()) and abs(got["area_ratio"] - 1.25**2) < 0.06
    assert abs(got["centroid_offset"] - (6**2 + 5**2) ** 0.5) < 0.1
    assert raw < 0.6 < 0.97 < got["mask_iou_aligned"]
    # a square of nearly the disk's area (21 x 21 px) on its centre: placement is right, the shape is not
    square = torch.zeros(64, 64, dtype=torch.float64)
    square[24:45, 20:41] = 1
    got = mask_placement(square, true)
    shape_iou = float(((square > 0.5) & (true > 0.5)).sum() / ((square > 0.5) | (true > 0.5)).sum())
    assert abs(got["area_ratio"] - 1) < 0.05 and got["centroid_offset"] < 0.6
    assert abs(got["mask_iou_aligned"] - shape_iou) < 0.03 and got["mask_iou_aligned"] < 0.92
    assert all(v != v for v in mask_placement(torch.zeros(64, 64), true).values())  # empty: NaN


def test_mask_iou_refuses_masks_that_would_broadcast():
    masks = _rig_masks(0)
    assert mask_iou(masks, masks) == 1.0
    with pytest.raises(ValueError, match=r"\(32, 64, 64\) and \(32, 1, 64, 64\).*same shape"):
        mask_iou(masks, masks[:, None])
    empty = torch.zeros(2, 8, 8)
    assert mask_iou(empty, empty) == 1.0  # nothing to find, nothing found: not a miss
    half = empty.clone()
    half[:, :, :4] = 1
    assert mask_iou(half, torch.ones(2, 8, 8)) == 0.5
    assert per_view_iou(torch.stack([empty[0], half[0]]), torch.stack([empty[0], half[0]])).tolist() == [1.0, 1.0]


def test_foreground_colour_is_the_mean_inside_the_masks_over_all_views():
    rgb, mask = torch.ones(2, 3, 4, 4), torch.zeros(2, 1, 4, 4)  # white outside
    rgb[0, :, :2], mask[0, :, :2] = torch.tensor([0.2, 0.4, 0.6])[:, None, None], 0.9  # 8 pixels in view 0
    rgb[1, :, :1], mask[1, :, :1] = torch.tensor([0.6, 0.4, 0.2])[:, None, None], 0.6  # 4 pixels in view 1
    torch.testing.assert_close(foreground_colour(rgb, mask), torch.tensor([2 * 0.2 + 0.6, 1.2, 2 * 0.6 + 0.2]) / 3)
    assert foreground_colour(rgb, torch.zeros_like(mask)).tolist() == [0.0, 0.0, 0.0]  # no foreground: 0, not NaN


def test_best_common_scale_undoes_a_3d_scaling_of_the_object():
    """The true views of an object drawn 12 % too large in every view: the common scale finds
    the factor back (to the grid's step), and at it the masks match nearly exactly."""
    from train.diagnostics import scaled_about_centre

    true = _rig_masks(0).double()
    scales = [round(0.80 + 0.02 * i, 2) for i in range(21)]
    k, ious = best_common_scale(scaled_about_centre(true, 1.12), true, scales)
    assert abs(k - 1 / 1.12) <= 0.02
    assert ious[scales.index(1.0)] < 0.85 < 0.95 < max(ious)


def test_scaling_about_the_centre_keeps_a_centred_mask_centred():
    """Every rig view looks at the object's centre, the image's centre (pixel centres at integer
    coordinates, so (W - 1) / 2): scaling about it moves a symmetric mask's centroid nowhere."""
    from train.diagnostics import scaled_about_centre

    mask = torch.zeros(1, 16, 16)
    mask[0, 4:12, 5:11] = 1  # centred: rows 4..11 and columns 5..10 around 7.5
    axis = torch.arange(16, dtype=torch.float64)
    for k in (0.5, 1.5):
        scaled = scaled_about_centre(mask.double(), k)[0]
        centroid = [float((scaled.sum(1 - d) * axis).sum() / scaled.sum()) for d in (0, 1)]  # row, column
        assert centroid == pytest.approx([7.5, 7.5], abs=1e-6)
        assert float(scaled.sum()) == pytest.approx(48 * k**2, rel=0.1)


def test_mesh_errors_of_true_views_and_of_views_drawn_too_large():
    """The fast mesh of an object's true rig views has about its volume and splits its Chamfer
    distance into two small halves; views drawn 1.2 times too large in every view (what a
    3D scaling by 1.2 gives) carve a mesh about 1.2^3 times as large."""
    from mvdpp_core.pipeline import MultiViewResult
    from train.diagnostics import scaled_about_centre

    rendered = render_object("heldout", 2, size=64)
    rgb, masks = to_tensors(rendered.targets, 64)
    true = mesh_errors(*MultiViewResult(rgb, masks).for_reconstruction(), rendered.mesh)
    assert true.volume_iou > 0.6 and 0.9 < true.volume_ratio < 1.5  # a visual hull: a little larger
    assert true.chamfer == pytest.approx((true.accuracy + true.completeness) / 2)
    assert max(true.accuracy, true.completeness) < 0.05
    views = torch.cat([rgb, masks], 1)  # 32 4 S S: colours scaled with the masks (reconstruct snaps to their edges)
    large = torch.stack([scaled_about_centre(views[:, c], 1.2) for c in range(4)], 1)
    grown = mesh_errors(*MultiViewResult(large[:, :3], large[:, 3:]).for_reconstruction(), rendered.mesh)
    assert 1.2**3 * 0.85 < grown.volume_ratio / true.volume_ratio < 1.2**3 * 1.15
    assert grown.accuracy > true.accuracy and grown.volume_iou < true.volume_iou
    nothing = mesh_errors(*MultiViewResult(rgb, torch.zeros_like(masks)).for_reconstruction(), rendered.mesh)
    assert nothing.volume_iou == 0.0 and math.isnan(nothing.chamfer) and math.isnan(nothing.volume_ratio)
