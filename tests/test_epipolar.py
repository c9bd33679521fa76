"""Epipolar attention bias: the rig's true correspondences score high and the rest low,
condition views stay pose-free, gain 0 is plain global attention, view equivariance, and the
training switch that starts it."""

import dataclasses
import itertools
import math

import pytest
import torch
from tiny_models import (
    assert_fixed_gains,
    assert_gain_matters_and_permutes,
    assert_initialised_unet_equals_base,
    tiny_model,
    unet_inputs,
    unet_with,
)

from mvdpp_core.attention import AttentionBackend, attend
from mvdpp_core.cameras import NUM_TARGET_VIEWS, intrinsics, pixel_rays, project, rig_c2w
from mvdpp_core.checkpoint import save_checkpoint
from mvdpp_core.config import PredictionType, preset
from mvdpp_core.geometry import EPIPOLAR_FLOOR, _check_epipolar_size, epipolar_bias, epipolar_rows, epipolar_table
from mvdpp_core.unet import MultiViewUNet
from train.config import InitSource, ModelInitConfig
from train.models import build_mvdiff_model

CFG = dataclasses.replace(preset("tiny").unet, epipolar_attention=True)
SIZE = 8  # tokens per side in the table tests


def test_true_correspondences_score_high_and_the_rest_low():
    """A point inside the object's box lands, in every pair of rig views that see it, on tokens
    whose bias is near 0 (the query token's ray passes within its own half-token of the point);
    most other tokens of the other view sit at the floor."""
    table = epipolar_table(SIZE)  # (32 l, 32 l)
    points = torch.rand(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    pixels, _ = project(points, rig_c2w(torch.float64), intrinsics(SIZE).double())  # v n 2
    assert ((pixels >= 0) & (pixels < SIZE)).all()  # r = 1.5 and 60 degrees: every view sees the box
    token = pixels.floor().long()
    rows = torch.arange(NUM_TARGET_VIEWS)[:, None] * SIZE * SIZE + token[..., 1] * SIZE + token[..., 0]  # v n
    hit = torch.stack([table[rows[:, n][:, None], rows[:, n][None, :]] for n in range(30)])  # n i j
    assert hit.min() > -1.5, f"a true correspondence scored {hit.min():.2f}"
    table = table.reshape(NUM_TARGET_VIEWS, SIZE * SIZE, NUM_TARGET_VIEWS, SIZE * SIZE)
    for view in range(NUM_TARGET_VIEWS):
        assert (table[view, :, view] == 0).all(), "a view's own tokens must be unbiased (plain self-attention)"
    # At the tiny preset's 16 x 16 attention grid, a query keeps about a sixth of another view's
    # tokens (the segment crosses the object's sphere) and sends most to the floor.
    big = epipolar_table(16).reshape(NUM_TARGET_VIEWS, 256, NUM_TARGET_VIEWS, 256)
    other = big.permute(0, 2, 1, 3)[~torch.eye(NUM_TARGET_VIEWS, dtype=torch.bool)]  # pairs l l
    assert (other > -2).float().mean() < 0.25
    assert (other < EPIPOLAR_FLOOR + 0.5).float().mean() > 0.5


@pytest.mark.parametrize(("size", "views"), [(SIZE, list(range(NUM_TARGET_VIEWS))), (16, [1, 13, 22, 31])])
def test_the_table_built_by_the_rigs_turn_equals_every_row_computed_directly(size, views):
    """``epipolar_table`` computes the azimuth-0 views' rows and turns them by the rig's 45-degree
    symmetry; every other view's rows, computed from its own rays, must come out the same."""
    tokens = size * size
    table = epipolar_table(size).reshape(NUM_TARGET_VIEWS, tokens, NUM_TARGET_VIEWS, tokens)
    direct = epipolar_rows(size, views)
    torch.testing.assert_close(table[views], direct, rtol=0, atol=1e-6)
    assert (direct > EPIPOLAR_FLOOR).float().mean() > 0.1  # not a table of floors that would match anything


def test_condition_views_are_pose_free_and_rows_follow_the_view_ids():
    tokens = SIZE * SIZE
    bias = epipolar_bias(torch.tensor([[8, 3, 32], [3, 41, 8]]), tokens)
    assert bias.shape == (2, 3 * tokens, 3 * tokens)
    assert (bias[0, 2 * tokens :] == 0).all() and (bias[0, :, 2 * tokens :] == 0).all()
    table = epipolar_table(SIZE)
    block_8_3 = table[8 * tokens : 9 * tokens, 3 * tokens : 4 * tokens]  # queries of view 8, keys of view 3
    torch.testing.assert_close(bias[0, :tokens, tokens : 2 * tokens], block_8_3)
    # The same pair of rig views in another order and with another condition slot: the same block.
    torch.testing.assert_close(bias[1, 2 * tokens :, :tokens], bias[0, :tokens, tokens : 2 * tokens])
    last = epipolar_bias(torch.tensor([[31, 0, 33]]), tokens)  # the rig's last slot is a target view too
    torch.testing.assert_close(last[0, :tokens, tokens : 2 * tokens], table[31 * tokens :, :tokens])
    assert (last[0, :tokens, tokens : 2 * tokens] < 0).any()
    with pytest.raises(ValueError, match="square token grids"):
        epipolar_bias(torch.tensor([[0, 1]]), 8)
    with pytest.raises(ValueError, match="epipolar_attention off"):
        epipolar_table(64)
    _check_epipolar_size(32)  # the largest grid allowed (its table would take 4 GiB: not built here)
    with pytest.raises(ValueError, match="33x33 tokens"):
        _check_epipolar_size(33)


def test_attend_adds_the_bias_to_the_logits():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, 2, 6, 6, generator=g)
    out = attend(q, k, v, 2, AttentionBackend.SDPA, bias)
    qh, kh, vh = (t.reshape(2, 6, 2, 4).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / 2 + bias, dim=-1)
    torch.testing.assert_close(out, (weights @ vh).transpose(1, 2).reshape(2, 6, 8))


def test_zero_gain_keeps_the_diffusers_base_and_plain_global_attention():
    mv = assert_initialised_unet_equals_base(CFG)
    assert all((p == 0).all() for p in mv.epipolar.parameters())
    plain = MultiViewUNet(dataclasses.replace(CFG, epipolar_attention=False)).eval()
    state = {k: v for k, v in mv.state_dict().items() if "epipolar" not in k}
    plain.load_state_dict(state)
    mv.set_attention_backend("sdpa")
    sample, t, ids, ctx = unet_inputs(CFG, 2, 5, size=16)
    with torch.no_grad():
        torch.testing.assert_close(mv(sample, t, ids, ctx), plain(sample, t, ids, ctx), atol=1e-5, rtol=1e-5)


@pytest.fixture
def epipolar_unet() -> MultiViewUNet:
    return unet_with(CFG, "epipolar", 1.0)


@torch.no_grad()
def test_epipolar_bias_changes_global_attention_and_permutes_with_the_views(epipolar_unet):
    sample, t, ids, ctx = unet_inputs(CFG, 2, 6, size=16)
    assert_gain_matters_and_permutes(epipolar_unet, epipolar_unet.epipolar, sample, t, ids, ctx)


def test_gains_are_fixed_buffers_stored_with_the_model(epipolar_unet):
    """The bias needs no gradient (SDPA then keeps its fast path); the gain travels in the state dict."""
    assert_fixed_gains(epipolar_unet, "epipolar", epipolar_unet.epipolar.layers, 1.0, torch.tensor([[0, 9, 20, 32]]))


def test_training_init_starts_the_gain_from_scratch():
    init = ModelInitConfig(architecture={"unet": {"epipolar_attention": True}}, epipolar_gain=1.0)
    model = build_mvdiff_model(init, PredictionType.V_PREDICTION)
    assert all((layer.gain == 1).all() for layer in model.unet.epipolar.layers)


def test_a_bundle_continues_with_epipolar_attention_switched_on_and_every_weight_kept(tmp_path):
    """The bias adds no trained weight, so a bundle without it continues with it: every tensor of
    the bundle is carried over unchanged, the gains start at init.epipolar_gain and change the
    output; a bundle that has the bias keeps its gains, and asking for new ones is refused."""
    path = save_checkpoint(tiny_model(seed=3, view_scale=1.0), tmp_path / "plain.safetensors")
    plain = build_mvdiff_model(ModelInitConfig(source=InitSource.BUNDLE, path=str(path)), PredictionType.EPSILON)
    assert plain.unet.epipolar is None  # without the gain the bundle is continued as it is
    init = ModelInitConfig(source=InitSource.BUNDLE, path=str(path), epipolar_gain=0.5)
    model = build_mvdiff_model(init, PredictionType.EPSILON)
    assert model.config.unet.epipolar_attention
    assert all((layer.gain == 0.5).all() for layer in model.unet.epipolar.layers)
    weights, bundle = model.state_dict(), plain.state_dict()
    assert set(weights) - set(bundle) == {k for k in weights if ".epipolar_attention." in k}
    for key, value in bundle.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
    sample, t, ids, ctx = unet_inputs(model.config.unet, 1, 4, size=16)
    with torch.no_grad():
        assert not torch.allclose(model.unet(sample, t, ids, ctx), plain.unet(sample, t, ids, ctx), atol=1e-4)
    with_bias = save_checkpoint(model, tmp_path / "epipolar.safetensors")
    with pytest.raises(ValueError, match="already has epipolar attention"):
        build_mvdiff_model(dataclasses.replace(init, path=str(with_bias)), PredictionType.EPSILON)
    kept = build_mvdiff_model(ModelInitConfig(source=InitSource.BUNDLE, path=str(with_bias)), PredictionType.EPSILON)
    assert all((layer.gain == 0.5).all() for layer in kept.unet.epipolar.layers)


def test_the_rows_of_some_query_views_are_those_of_the_full_bias():
    """Under view parallelism a rank builds only its own views' rows against every key view
    (tests/test_view_parallel.py checks the split model against one process)."""
    ids = torch.tensor([[0, 9, 17, 32, 3], [5, 33, 12, 20, 7]])
    full = epipolar_bias(ids, 16)
    assert torch.equal(epipolar_bias(ids, 16, slice(2, 4)), full[:, 2 * 16 : 4 * 16])
    assert torch.equal(epipolar_bias(ids, 16, slice(0, 5)), full)


@torch.no_grad()
def test_a_sampling_run_reuses_one_bias_and_a_new_view_set_rebuilds_it(epipolar_unet):
    sample, t, _, ctx = unet_inputs(CFG, 2, 3, size=16)
    ids = torch.tensor([[0, 9, 32], [0, 9, 32]])  # a guidance batch: one bias for both halves
    first = epipolar_unet(sample, t, ids, ctx)
    cache = epipolar_unet._epipolar_cache
    assert cache.view_ids.shape == (1, 3)
    torch.testing.assert_close(epipolar_unet(sample, t, ids, ctx), first)
    assert epipolar_unet._epipolar_cache is cache
    moved = epipolar_unet(sample, t, torch.tensor([[0, 10, 32], [0, 10, 32]]), ctx)
    assert epipolar_unet._epipolar_cache is not cache and (moved - first).abs().max() > 1e-4


def _chord_depths(origin: torch.Tensor, direction: torch.Tensor, radius: float, samples: int) -> torch.Tensor:
    """Depths along a ray of ``samples`` points spanning its chord through the sphere of ``radius``
    about the origin, found numerically (ternary search for the nearest point, bisection for the
    ends); a ray that misses the sphere gives its nearest point alone."""

    def dist(t: float) -> float:
        return float((origin + t * direction).norm())

    lo, hi = 0.0, 3.0
    for _ in range(100):  # the distance to the centre is convex along the ray
        lo, hi = (
            (lo, (lo + 2 * hi) / 3) if dist((2 * lo + hi) / 3) < dist((lo + 2 * hi) / 3) else ((2 * lo + hi) / 3, hi)
        )
    nearest = (lo + hi) / 2
    if dist(nearest) > radius:
        return torch.tensor([nearest], dtype=torch.float64)
    ends = []
    for lo, hi in ((0.0, nearest), (3.0, nearest)):  # lo outside the sphere, hi inside
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if dist(mid) <= radius else (mid, hi)
        ends.append((lo + hi) / 2)
    return torch.linspace(ends[0], ends[1], samples, dtype=torch.float64)


def test_every_entry_is_the_distance_to_the_ray_s_chord_through_the_object_s_sphere():
    """An independent reference: the query token's ray's chord through the bounding sphere (radius
    sqrt(3) / 2: the [-0.5, 0.5]^3 box's corners), found numerically and sampled, projected into the
    key view; the key token's nearest distance to it sets the table's entry, its Gaussian log-weight
    floored. Rays through the image's corners miss the sphere and keep their nearest point."""
    c2w, K = rig_c2w(torch.float64), intrinsics(SIZE)
    origins, dirs = (t.reshape(NUM_TARGET_VIEWS, -1, 3) for t in pixel_rays(c2w, K, SIZE, SIZE))
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(-1, 2).double()
    table = epipolar_table(SIZE).reshape(NUM_TARGET_VIEWS, SIZE * SIZE, NUM_TARGET_VIEWS, SIZE * SIZE)
    misses = 0
    for view, token in itertools.product([0, 13, 31], range(SIZE * SIZE)):  # three elevations
        depths = _chord_depths(origins[view, token], dirs[view, token], math.sqrt(3) / 2, 1001)
        misses += len(depths) == 1
        pixels, _ = project(origins[view, token] + depths[:, None] * dirs[view, token], c2w, K)  # v n 2
        d2 = torch.cdist(centres[None].expand(NUM_TARGET_VIEWS, -1, -1), pixels).min(-1).values ** 2  # v l
        expected = (-d2 / 2).clamp(min=EPIPOLAR_FLOOR).float()
        expected[view] = 0.0
        torch.testing.assert_close(table[view, token], expected, rtol=0, atol=1e-4)
    assert 0 < misses < 3 * SIZE * SIZE  # both kinds of ray were checked
