"""The condition stage (mvdpp_core/condition.py): one framing for generate() and the node,
the training dropout, and the layout generation hands to reconstruction."""

import pytest
import torch
from tiny_models import object_views, tiny_model

from mvdpp_core.condition import (
    Condition,
    ConditionViews,
    MaskConvention,
    drop_condition,
    frame_condition,
    null_condition,
)
from mvdpp_core.pipeline import MultiViewResult, generate


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, view_scale=0.3)


def test_generate_frames_photos_with_frame_condition_and_reads_alpha_or_either_mask_polarity(model):
    """Photos (off-centre discs) given to generate() are framed exactly as frame_condition (the
    node's one core call) frames them; RGBA alpha and an alpha-inverted mask give the same views."""
    images, masks = object_views(2, size=64, seed=3)
    run = {"seed": 3, "steps": 2, "sampler": "ddim", "guidance": 2.0}
    plain = generate(model, images, masks, **run)
    framed = frame_condition(images, masks, size=model.config.image_size)
    ys, xs = torch.nonzero(framed.masks[0, 0] > 0.5, as_tuple=True)
    assert abs((xs.float().mean() + 0.5) / 64 - 0.5) < 0.03  # recentred
    assert torch.equal(generate(model, framed, **run).images, plain.images)
    rgba = torch.cat([images, masks[:, None]], dim=1)
    assert torch.equal(generate(model, rgba, **run).images, plain.images)
    inverted = generate(model, images, 1 - masks, mask_convention=MaskConvention.ALPHA_INVERTED, **run)
    assert torch.equal(inverted.images, plain.images)


def test_python_api_gives_the_nodes_errors(model):
    images, masks = object_views(1, size=64)
    with pytest.raises(ValueError, match="looks inverted.*Set mask_convention to 'alpha-inverted"):
        generate(model, images, 1 - masks, steps=1)
    with pytest.raises(ValueError, match="not a plain backdrop"):  # no mask, no alpha, cluttered photo
        generate(model, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)), steps=1)
    with pytest.raises(ValueError, match="do not match images"):
        ConditionViews.framed(images, masks[:, :32, :32])


def test_training_dropout_drops_latents_with_the_condition_and_tokens_alone():
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(3, 2, 4, 8, 8, generator=g), torch.randn(3, 2, 16, generator=g))
    empty = torch.randn(3, 4, 8, 8, generator=g)
    drop, tokens = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    out = drop_condition(cond, empty, drop, tokens)
    null = null_condition(cond, empty)
    assert torch.equal(out.latents[0], null.latents[0]) and torch.equal(out.embeddings[0], null.embeddings[0])
    assert torch.equal(out.latents[1], cond.latents[1]) and (out.embeddings[1] == 0).all()
    assert torch.equal(out.latents[2], cond.latents[2]) and torch.equal(out.embeddings[2], cond.embeddings[2])


def test_multiview_result_hands_reconstruction_channels_last_views_and_masks():
    images, masks = torch.rand(32, 3, 8, 8), torch.rand(32, 1, 8, 8)
    views, view_masks = MultiViewResult(images, masks).for_reconstruction()
    assert views.shape == (32, 8, 8, 3) and view_masks.shape == (32, 8, 8)
    m = masks[5, 0, 2, 3]
    torch.testing.assert_close(views[5, 2, 3], images[5, :, 2, 3] * m + 1 - m)  # on white through the mask
    assert view_masks[5, 2, 3] == m
