"""Per-token geometry in global attention: exact rig rays, zero-initialised identity with the
base, view equivariance, and the training switches that use it."""

import dataclasses

import pytest
import torch
from tiny_models import assert_initialised_unet_equals_base, assert_permutes_with_views, unet_inputs, unet_with

from mvdpp_core.cameras import NUM_TARGET_VIEWS, intrinsics, project, rig_c2w
from mvdpp_core.config import PredictionType, preset
from mvdpp_core.geometry import GEOMETRY_CHANNELS, rig_plucker, token_geometry, tokens_at
from mvdpp_core.unet import MultiViewUNet
from train.config import InitSource, ModelInitConfig
from train.models import build_mvdiff_model

CFG = dataclasses.replace(preset("tiny").unet, geometry_encoding=True)


def _inputs(b: int, v: int, seed: int = 0, size: int = 8):
    return unet_inputs(CFG, b, v, seed, size)


def test_plucker_rays_pass_through_their_pixels():
    """A point along each target pixel's ray, rebuilt from its Plücker coordinates, projects
    back onto that pixel's centre in the rig camera."""
    size = 8
    plucker = rig_plucker(size).double()  # v 6 h w
    d, m = plucker[:, :3], plucker[:, 3:]
    torch.testing.assert_close(d.norm(dim=1), torch.ones(NUM_TARGET_VIEWS, size, size, dtype=torch.float64))
    assert (d * m).sum(1).abs().max() < 1e-6  # a moment is orthogonal to its direction
    closest = torch.cross(d, m, dim=1)  # the ray's point nearest the origin
    c2w = rig_c2w(torch.float64)
    for view in (0, 9, 31):
        points = (closest[view] + 0.3 * d[view]).permute(1, 2, 0).reshape(-1, 3)  # (h w) 3
        pixels, depth = project(points, c2w[view : view + 1], intrinsics(size).double())
        ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        expected = torch.stack([xs, ys], dim=-1).reshape(-1, 2).double()
        torch.testing.assert_close(pixels[0], expected, atol=2e-3, rtol=0)  # float32 rays
        assert (depth > 0).all()


def test_image_position_is_its_sinusoidal_definition_at_pixel_centres():
    """sin / cos of pi 2^k u, k = 0, 1, 2, at pixel centres u in [-1, 1]; columns first, then rows.
    Checkpoints with geometry (the shipped default) learned on these values: they are part of the
    format, so a change must fail here, not only move generated views."""
    from mvdpp_core.geometry import image_position

    s = 6
    got = image_position(s).double()
    assert got.shape == (12, s, s)
    u = (torch.arange(s, dtype=torch.float64) + 0.5) / s * 2 - 1  # -5/6 .. 5/6
    angle = torch.pi * torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)[:, None] * u  # 3 s
    waves = torch.cat([angle.sin(), angle.cos()])  # 6 s
    torch.testing.assert_close(got[:6], waves[:, None, :].expand(-1, s, -1), atol=1e-6, rtol=0)  # columns vary
    torch.testing.assert_close(got[6:], waves[:, :, None].expand(-1, -1, s), atol=1e-6, rtol=0)  # rows vary


def test_condition_views_are_pose_free():
    geometry = token_geometry(torch.tensor([0, 31, 32, 41]), 4)  # 2 targets, 2 condition views
    assert geometry.shape == (4, GEOMETRY_CHANNELS, 4, 4)
    assert (geometry[2:, 2:8] == 0).all(), "condition views must carry no ray (their poses are unknown)"
    assert (geometry[:2, 2:8] != 0).any()
    torch.testing.assert_close(geometry[:, :2, 0, 0], torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    torch.testing.assert_close(geometry[2, 8:], geometry[0, 8:])  # image position: same for every view


def test_tokens_pool_square_grids_and_refuse_others():
    geometry = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = tokens_at(geometry, 4)  # 2x2 tokens
    torch.testing.assert_close(pooled[:, 0], geometry[..., :2, :2].mean(dim=(-1, -2)))
    with pytest.raises(ValueError, match="does not pool to 8 tokens"):
        tokens_at(geometry, 8)


def test_zero_initialised_geometry_keeps_the_diffusers_base_exactly():
    mv = assert_initialised_unet_equals_base(CFG)
    assert mv.geometry is not None and all((p == 0).all() for p in mv.geometry.parameters())


@pytest.fixture
def geometry_unet() -> MultiViewUNet:
    return unet_with(CFG, "geometry", 0.1)


@torch.no_grad()
def test_geometry_tells_rig_slots_apart_without_view_embeddings(geometry_unet):
    """View scale 0: only the geometry encoding can make two target slots differ."""
    assert geometry_unet.unet.class_embedding.scale.abs().max() == 0
    sample, t, _, ctx = _inputs(1, 2)
    out = geometry_unet(sample, t, torch.tensor([[0, 32]]), ctx)
    moved = geometry_unet(sample, t, torch.tensor([[9, 32]]), ctx)
    assert (out - moved).abs().max() > 1e-3
    geometry_unet.geometry.reset_parameters(0.0)
    assert torch.equal(
        geometry_unet(sample, t, torch.tensor([[0, 32]]), ctx), geometry_unet(sample, t, torch.tensor([[9, 32]]), ctx)
    )


@torch.no_grad()
def test_permuting_views_with_their_ids_permutes_outputs_with_geometry(geometry_unet):
    assert_permutes_with_views(geometry_unet, *_inputs(2, 6))


def test_geometry_survives_a_backend_switch(geometry_unet):
    """The processors hold the encoding's weights by reference: re-installing them keeps it."""
    sample, t, ids, ctx = _inputs(1, 3)
    with torch.no_grad():
        before = geometry_unet(sample, t, ids, ctx)
        geometry_unet.set_attention_backend("sdpa")
        torch.testing.assert_close(geometry_unet(sample, t, ids, ctx), before)
    loss = geometry_unet(sample, t, ids, ctx).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in geometry_unet.geometry.parameters())


def test_training_init_builds_the_architecture_override_with_random_geometry():
    init = ModelInitConfig(architecture={"unet": {"geometry_encoding": True}}, geometry_init_std=0.05)
    model = build_mvdiff_model(init, PredictionType.V_PREDICTION)
    assert model.config.unet.geometry_encoding
    std = torch.cat([p.flatten() for p in model.unet.geometry.parameters()]).std().item()
    assert 0.04 < std < 0.06
    plain = build_mvdiff_model(ModelInitConfig(), PredictionType.V_PREDICTION)
    assert plain.unet.geometry is None and not plain.config.unet.geometry_encoding


def test_training_init_refuses_bad_architecture_overrides():
    with pytest.raises(ValueError, match="geometry_encodng.*allowed"):
        build_mvdiff_model(ModelInitConfig(architecture={"unet": {"geometry_encodng": True}}), PredictionType.EPSILON)
    with pytest.raises(ValueError, match="init.architecture.*source=bundle"):
        build_mvdiff_model(
            ModelInitConfig(source=InitSource.BUNDLE, path="x.safetensors", architecture={"image_size": 32}),
            PredictionType.EPSILON,
        )


def _first_view_model():
    """A seeded tiny model with ``target_condition: first_view`` and no image encoder."""
    from mvdpp_core.config import TargetCondition
    from mvdpp_core.model import MVDPPModel

    torch.manual_seed(0)
    config = dataclasses.replace(preset("tiny"), target_condition=TargetCondition.FIRST_VIEW)
    return MVDPPModel(config, with_image_encoder=False)


def test_first_view_target_condition_feeds_the_input_latent_to_every_target():
    """ModelConfig.target_condition=first_view: every target's condition channels hold the first
    condition view's latent (Zero123's input concatenation); the null condition holds the empty
    latent everywhere, so guidance and condition dropout still remove the whole input."""
    from mvdpp_core.model import Condition, MVDPPModel

    model = _first_view_model()
    empty = torch.randn(1, 4, 16, 16)
    cond = Condition(torch.randn(1, 2, 4, 16, 16), torch.randn(1, 2, 32))
    noisy = torch.randn(1, 5 + 2, 4, 16, 16)
    sample, ids = model.unet_input(noisy, cond, empty)
    for view in range(5):
        torch.testing.assert_close(sample[0, view, 5:], cond.latents[0, 0])
        assert (sample[0, view, 4] == 0).all()  # still marked as a target by the branch mask
    torch.testing.assert_close(sample[0, 5:, 5:], cond.latents[0])
    null, _ = model.unet_input(noisy, model.null_condition(cond, empty), empty)
    torch.testing.assert_close(null[0, :, 5:], empty.expand(7, -1, -1, -1))
    paper = MVDPPModel(preset("tiny"), with_image_encoder=False)
    torch.testing.assert_close(paper.unet_input(noisy, cond, empty)[0][0, :5, 5:], empty.expand(5, -1, -1, -1))


def test_first_view_flags_give_dropped_objects_the_papers_input():
    """unet_input(first_view=flags) (training's stage.first_view_dropout): an object whose flag is
    off gets the empty latent in its targets, as with target_condition: empty, while its
    condition views keep their latents; the other objects are unchanged."""
    from mvdpp_core.model import Condition

    model = _first_view_model()
    empty = torch.randn(2, 4, 16, 16)
    cond = Condition(torch.randn(2, 1, 4, 16, 16), torch.randn(2, 1, 32))
    noisy = torch.randn(2, 3 + 1, 4, 16, 16)
    all_on, _ = model.unet_input(noisy, cond, empty)
    flagged, _ = model.unet_input(noisy, cond, empty, first_view=torch.tensor([True, False]))
    torch.testing.assert_close(flagged[0], all_on[0])
    torch.testing.assert_close(flagged[1, :3, 5:], empty[1].expand(3, -1, -1, -1))
    torch.testing.assert_close(flagged[1, 3:], all_on[1, 3:])  # the condition view keeps its latent
    torch.testing.assert_close(flagged[:, :, :5], all_on[:, :, :5])
