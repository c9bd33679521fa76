"""generate(): layout of the 9-channel input, guidance, determinism, progress, mirror, seed and input averaging
(with the azimuth alignment of pose-free views), bad input."""

import dataclasses
import re

import pytest
import torch
from tiny_models import object_views, tiny_model

from mvdpp_core import pipeline
from mvdpp_core.common import STRAIGHT_MASK_FLOOR, composite_on_white, straight_colours
from mvdpp_core.condition import ConditionViews, encode_views
from mvdpp_core.config import TargetCondition, preset
from mvdpp_core.model import MVDPPModel
from mvdpp_core.pipeline import SAMPLER_DEFAULTS, MultiViewResult, azimuth_shift, generate, guided_denoiser
from mvdpp_core.samplers import SamplerName, get_sampler
from train.data.dataset import to_tensors
from train.procedural.render import render_object


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, view_scale=0.3)


@torch.no_grad()
def test_unet_input_layout(model):
    images, masks = object_views(2)
    cond = model.encode_condition(images, masks[:, None])
    empty = model.empty_latent()
    noisy = torch.randn(1, 34, 4, 16, 16)
    sample, ids = model.unet_input(noisy, cond, empty)
    assert sample.shape == (1, 34, 9, 16, 16)
    torch.testing.assert_close(sample[:, :, :4], noisy)
    assert (sample[0, :32, 4] == 0).all() and (sample[0, 32:, 4] == 1).all()
    torch.testing.assert_close(sample[0, :32, 5:], empty.expand(32, -1, -1, -1))
    torch.testing.assert_close(sample[0, 32:, 5:], cond.latents[0])
    assert ids.tolist() == [list(range(34))]
    # Training drops target views: their rig indices are passed through.
    _, ids = model.unet_input(noisy[:, :10], cond, empty, target_ids=torch.tensor([[0, 3, 5, 7, 9, 11, 13, 30]]))
    assert ids.tolist() == [[0, 3, 5, 7, 9, 11, 13, 30, 32, 33]]


@torch.no_grad()
def test_guidance_interpolates_between_null_and_full_condition(model):
    images, masks = object_views(1)
    cond = model.encode_condition(images, masks[:, None])
    x = torch.randn(1, 33, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    full, null = guided_denoiser(model, cond, 1.0)(x, t), guided_denoiser(model, cond, 0.0)(x, t)
    assert (full - null).abs().max() > 1e-4, "the condition must change the prediction"
    torch.testing.assert_close(
        guided_denoiser(model, cond, 3.0)(x, t), null + 3.0 * (full - null), atol=1e-5, rtol=1e-4
    )


def test_generate_is_deterministic_per_seed_and_reports_every_step(model):
    images, masks = object_views(2, size=80)
    seen = []
    kwargs = dict(steps=2, sampler="dpmpp_2m", guidance=2.0)
    a = generate(model, images, masks, seed=7, callback=lambda i, n, x0: seen.append((i, n, tuple(x0.shape))), **kwargs)
    assert seen == [(1, 2, (1, 34, 4, 16, 16)), (2, 2, (1, 34, 4, 16, 16))], "condition views are denoised too"
    assert a.images.shape == (32, 3, 64, 64) and a.masks.shape == (32, 1, 64, 64)
    assert 0 <= a.images.min() and a.images.max() <= 1
    b = generate(model, images, masks, seed=7, **kwargs)
    c = generate(model, images, masks, seed=8, **kwargs)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


@torch.no_grad()
def test_on_white_gives_back_the_decoded_views_and_averages_them_plainly(model, monkeypatch):
    """The MVAE decodes views on white; ``generate`` keeps their straight colours, so compositing
    once (``on_white``) gives the decoded views back, antialiased outlines included, instead of
    lightening them a second time; and the mean of results is then the plain mean of their
    views on white."""
    decoded = []
    decode = model.vae.decode
    monkeypatch.setattr(model.vae, "decode", lambda z: decoded.append(decode(z)) or decoded[-1])
    images, masks = object_views(1)
    kwargs = dict(steps=2, sampler="ddim", guidance=2.0)
    result = generate(model, images, masks, seed=3, **kwargs)
    rgb, mask = (torch.cat([d[i] for d in decoded]) for i in (0, 1))
    assert ((mask > 0.05) & (mask < 0.95)).float().mean() > 0.01, "soft mask pixels must exist for this to test"
    consistent = mask >= STRAIGHT_MASK_FLOOR
    torch.testing.assert_close(result.on_white()[consistent.expand_as(rgb) & (rgb >= 1 - mask)],
                               rgb[consistent.expand_as(rgb) & (rgb >= 1 - mask)], atol=1e-5, rtol=0)
    other = generate(model, images, masks, seed=4, **kwargs)
    mean = MultiViewResult.mean([result, other]).on_white()
    torch.testing.assert_close(mean, (result.on_white() + other.on_white()) / 2, atol=5e-3, rtol=0)


def test_straight_colours_invert_compositing_on_white():
    g = torch.Generator().manual_seed(0)
    colours, masks = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 1, 8, 8, generator=g)
    on_white = composite_on_white(colours, masks)
    straight = straight_colours(on_white, masks)
    above = (masks >= STRAIGHT_MASK_FLOOR).expand_as(colours)
    torch.testing.assert_close(straight[above], colours[above], atol=1e-5, rtol=0)
    torch.testing.assert_close(straight[~above], on_white[~above])  # nearly all backdrop: kept on white
    torch.testing.assert_close(composite_on_white(straight, masks)[above], on_white[above], atol=1e-6, rtol=0)
    overshoot = straight_colours(torch.tensor([1.3, -0.2]), torch.tensor([0.5, 0.5]))  # a decoder past [0, 1]
    assert overshoot.tolist() == [1.0, 0.0]


def test_an_option_is_read_as_its_enum_whatever_its_case_or_leading_dot():
    from mvdpp_core.common import parse_enum
    from mvdpp_core.condition import MaskConvention
    from mvdpp_core.reconstruction.mesh import MeshFormat

    assert parse_enum(SamplerName, SamplerName.DDPM, "sampler") is SamplerName.DDPM
    assert parse_enum(SamplerName, "DDIM", "sampler") is SamplerName.DDIM
    assert parse_enum(MeshFormat, ".GLB", "format") is MeshFormat.GLB
    text = "alpha-inverted (LoadImage MASK)"  # an option text in mixed case is taken as written
    assert parse_enum(MaskConvention, text, "mask_convention") is MaskConvention.ALPHA_INVERTED
    for bad in ("euler", 3, None, "ddim "):
        message = rf"unknown sampler {re.escape(repr(bad))}; allowed: ddpm, ddim, dpmpp_2m\."
        with pytest.raises(ValueError, match=message):
            parse_enum(SamplerName, bad, "sampler")


def test_generate_stops_when_the_callback_raises(model):
    images, masks = object_views(1)

    class Cancelled(Exception):
        pass

    steps = []

    def cancel_at_first_step(i, n, x0):
        steps.append(i)
        raise Cancelled

    with pytest.raises(Cancelled):
        generate(model, images, masks, steps=50, sampler="ddim", callback=cancel_at_first_step)
    assert steps == [1]


@pytest.mark.parametrize(
    "images, masks, match",
    [
        (torch.rand(1, 64, 64, 3), torch.ones(1, 64, 64), r"shape \(1, 64, 64, 3\); expected \(n, 3, H, W\)"),
        (torch.rand(64, 64), torch.ones(1, 64, 64), r"expected \(n, 3, H, W\)"),
        (torch.rand(0, 3, 64, 64), torch.ones(0, 64, 64), "0 condition views given; the model takes 1 to 10"),
        (torch.rand(11, 3, 64, 64), torch.ones(11, 64, 64), "11 condition views given; the model takes 1 to 10"),
        (torch.rand(2, 3, 64, 64), torch.ones(2, 32, 32), "do not match images.*same height and width"),
        (torch.rand(2, 3, 64, 64), torch.ones(1, 64, 64), "do not match images"),
        (torch.full((1, 3, 64, 64), float("nan")), torch.ones(1, 64, 64), "images contain NaN"),
        (torch.rand(1, 3, 64, 64), torch.full((1, 64, 64), float("nan")), "masks contain NaN"),
        (torch.rand(1, 3, 64, 64) * 255, torch.ones(1, 64, 64), r"outside \[0, 1\]; scale them"),
        (torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64), r"mask of condition view\(s\) \[0\] is empty"),
    ],
)
def test_bad_condition_views_are_refused(model, images, masks, match):
    with pytest.raises(ValueError, match=match):
        generate(model, images, masks, steps=1)


def test_bad_sampling_arguments_are_refused(model):
    images, masks = object_views(1)
    with pytest.raises(ValueError, match="steps=0; allowed 1..1000"):
        generate(model, images, masks, steps=0)
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'"):
        generate(model, images, masks, sampler="euler_a")
    with pytest.raises(ValueError, match=r"embeddings have shape \(1, 7\); this model needs \(1, 32\)"):
        generate(model, images, masks, steps=1, embeddings=torch.zeros(1, 7))


def test_sizes_the_vae_cannot_take_are_refused(model):
    images, masks = object_views(1, size=70)
    with pytest.raises(ValueError, match="70x70 cannot go through the VAE, which downsamples by 4"):
        model.encode_condition(images, masks[:, None])


@pytest.mark.parametrize("size_in", [80, 400])
def test_recenter_centres_and_scales_the_object(size_in):
    from mvdpp_core.inputs import recenter

    ys, xs = torch.meshgrid(torch.arange(size_in) + 0.5, torch.arange(size_in) + 0.5, indexing="ij")
    mask = ((xs - 0.3 * size_in) ** 2 / 4 + (ys - 0.6 * size_in) ** 2 < (0.1 * size_in) ** 2).float()
    image = mask * torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1) + (1 - mask)
    out_image, out_mask = recenter(image[None], mask[None, None], 64, fill=0.5)
    fg = torch.nonzero(out_mask[0, 0] > 0.5)
    lo, hi = fg.min(0).values.float(), fg.max(0).values.float() + 1
    torch.testing.assert_close((lo + hi) / 2, torch.tensor([32.0, 32.0]), atol=1.0, rtol=0)
    assert (hi - lo).max().item() == pytest.approx(32, abs=1.5)
    torch.testing.assert_close(out_image[0, :, 0, 0], torch.ones(3), msg="background is white")
    inside = out_image[0, :, out_mask[0, 0] > 0.99]
    assert (inside[0] > 0.95).all() and (inside[1:] < 0.05).all(), "object colour survives"


def test_mirror_average_is_equivariant_to_mirroring_the_input(model):
    """With ``mirror_average`` the output for the flipped photos is exactly the mirrored output
    (views flipped, azimuth a -> -a); the model alone is not, so the check can fail."""
    images, masks = object_views(2)
    views = ConditionViews.framed(images, masks)
    kwargs = dict(seed=3, steps=2, sampler="dpmpp_2m", guidance=2.0)
    seen = []
    averaged = generate(model, views, mirror_average=True, callback=lambda i, n, x0: seen.append((i, n)), **kwargs)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)], "both passes report their steps on one count"
    from_flipped = generate(model, views.mirrored(), mirror_average=True, **kwargs).mirrored()
    torch.testing.assert_close(averaged.images, from_flipped.images, atol=1e-6, rtol=0)
    torch.testing.assert_close(averaged.masks, from_flipped.masks, atol=1e-6, rtol=0)
    plain, mirrored = generate(model, views, **kwargs), generate(model, views.mirrored(), **kwargs).mirrored()
    assert (plain.masks - mirrored.masks).abs().max() > 1e-3, "the tiny model alone must not be equivariant"
    torch.testing.assert_close(averaged.masks, (plain.masks + mirrored.masks) / 2)
    weights = plain.masks + 1e-3, mirrored.masks + 1e-3
    torch.testing.assert_close(averaged.images, (plain.images * weights[0] + mirrored.images * weights[1])
                               / (weights[0] + weights[1]))


def test_average_seeds_is_the_mean_over_antithetic_noise_pairs_and_keeps_equivariance(model):
    """average_seeds=k averages k noise draws in antithetic pairs: the seed's noise, the same
    noise negated, then the next seed's. A pair cancels the part of the output that is odd in
    the noise: with a one-step ddim, whose output is the denoiser at the noise, the pair's mean
    sits closer to the mean over many seeds than two independent seeds do."""
    images, masks = object_views(1)
    views = ConditionViews.framed(images, masks)
    kwargs = dict(steps=2, sampler="ddim", guidance=2.0)
    seen = []
    two = generate(model, views, seed=5, average_seeds=2, callback=lambda i, n, x0: seen.append((i, n)), **kwargs)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    plain = generate(model, views, seed=5, **kwargs)
    cond, ts = encode_views(model, views), model.schedule.timesteps(2, SAMPLER_DEFAULTS[SamplerName.DDIM][1])
    negated = pipeline._sample(model, cond, 5, ts, get_sampler("ddim"), 2.0, None, negate=True)
    assert (plain.masks - negated.masks).abs().max() > 1e-3, "the two draws must differ for the mean to be tested"
    mean = MultiViewResult.mean([plain, negated])
    torch.testing.assert_close(two.masks, mean.masks)
    torch.testing.assert_close(two.images, mean.images)
    torch.testing.assert_close(MultiViewResult.mean([negated, plain]).images, mean.images)  # order does not matter
    three = generate(model, views, seed=5, average_seeds=3, **kwargs)
    torch.testing.assert_close(three.masks, (2 * mean.masks + generate(model, views, seed=6, **kwargs).masks) / 3)
    four = generate(model, views, seed=5, average_seeds=2, mirror_average=True, **kwargs)
    from_flipped = generate(model, views.mirrored(), seed=5, average_seeds=2, mirror_average=True, **kwargs)
    torch.testing.assert_close(four.masks, from_flipped.mirrored().masks, atol=1e-6, rtol=0)
    assert torch.equal(generate(model, views, seed=5, average_seeds=1, **kwargs).masks, plain.masks)
    # Variance reduction, against the mean over 16 seeds (one ddim step: the output is D(noise)).
    one_step = dict(steps=1, sampler="ddim", guidance=2.0)
    target = MultiViewResult.mean([generate(model, views, seed=100 + s, **one_step) for s in range(16)]).masks
    error = {
        "antithetic": [(generate(model, views, seed=s, average_seeds=2, **one_step).masks - target).square().mean()
                       for s in range(4)],
        "independent": [(MultiViewResult.mean([generate(model, views, seed=s, **one_step),
                                               generate(model, views, seed=s + 50, **one_step)]).masks - target)
                        .square().mean() for s in range(4)],
    }
    assert sum(error["antithetic"]) < 0.7 * sum(error["independent"]), error


def test_an_ensemble_averages_its_models_masks_and_takes_the_first_models_colours(model):
    """A tuple of models votes on the shape: the masks are the mean of the models' (weighted
    equally), the colours the first model's, so a partner that keeps less colour does not wash
    them out; in either order the masks are the same, and a model twice is that model alone."""
    other = tiny_model(seed=1, view_scale=0.3)
    images, masks = object_views(1)
    views = ConditionViews.framed(images, masks)
    kwargs = dict(seed=3, steps=1, sampler="ddim", guidance=2.0)
    seen = []
    both = generate((model, other), views, callback=lambda i, n, x0: seen.append((i, n)), **kwargs)
    assert seen == [(1, 2), (2, 2)]  # 2 models, one step each
    alone = [generate(m, views, **kwargs) for m in (model, other)]
    assert (alone[0].masks - alone[1].masks).abs().max() > 1e-3, "the models must differ for the mean to be tested"
    assert (alone[0].images - alone[1].images).abs().max() > 1e-3
    mean_masks = (alone[0].masks + alone[1].masks) / 2
    torch.testing.assert_close(both.masks, mean_masks)
    torch.testing.assert_close(both.images, alone[0].images)
    swapped = generate([other, model], views, **kwargs)
    torch.testing.assert_close(swapped.masks, mean_masks)
    torch.testing.assert_close(swapped.images, alone[1].images)
    twice = generate((model, model), views, **kwargs)
    torch.testing.assert_close(twice.masks, alone[0].masks)
    torch.testing.assert_close(twice.images, alone[0].images)


def test_an_ensemble_of_no_models_or_of_mixed_sizes_is_refused(model):
    images, masks = object_views(1)
    with pytest.raises(ValueError, match=r"model=\(\) holds no models"):
        generate((), images, masks, steps=1, sampler="ddim")
    with pytest.raises(TypeError, match="model is a str, not an MVDPPModel"):
        generate((model, "model.safetensors"), images, masks, steps=1, sampler="ddim")
    small = MVDPPModel(dataclasses.replace(preset("tiny"), image_size=32)).eval()
    with pytest.raises(ValueError, match=r"generate views of sizes \[64, 32\]; average only models of one image size"):
        generate((model, small), images, masks, steps=1, sampler="ddim")


@pytest.mark.parametrize("count", [0, 17, True, 1.5])
def test_bad_average_seeds_are_refused(model, count):
    images, masks = object_views(1)
    with pytest.raises(ValueError, match=rf"average_seeds={count!r}; allowed 1 to 16"):
        generate(model, images, masks, steps=1, sampler="ddim", average_seeds=count)


def test_mirror_average_refuses_outside_embeddings_and_non_bools(model):
    images, masks = object_views(1)
    dim = model.config.unet.cross_attention_dim
    with pytest.raises(ValueError, match=rf"embeddings were given from outside \(shape \(1, {dim}\)\)"):
        generate(model, ConditionViews.framed(images, masks, embeddings=torch.randn(1, dim)), steps=1,
                 sampler="ddim", mirror_average=True)
    with pytest.raises(TypeError, match="mirror_average='yes'; pass True or False"):
        generate(model, images, masks, steps=1, sampler="ddim", mirror_average="yes")


def test_azimuth_shift_finds_the_rig_azimuth_of_a_pose_free_condition_view():
    """From true rig views, every condition view's azimuth (drawn from the rig's 8, at an unknown
    elevation and distance) is found: with the estimate generated from it, the true views turned
    into its frame; and from its silhouette alone, where the estimate tells nothing (one view
    in every slot). Swapping the two estimates finds the opposite turn."""
    for index in range(4):
        rendered = render_object("heldout", index, size=64)
        (rgb, mask), (_, cond_mask) = to_tensors(rendered.targets, 64), to_tensors(rendered.conditions, 64)
        truth = MultiViewResult(rgb, mask)
        flat = MultiViewResult(rgb[8:9].expand(32, -1, -1, -1), mask[8:9].expand(32, -1, -1, -1))
        for k, camera in enumerate(rendered.cameras["conditions"]):
            shift = round(camera["azimuth_deg"] / 45) % 8
            view, first = cond_mask[k : k + 1], cond_mask[:1]
            assert azimuth_shift(truth.rotated(-shift), truth, view, first) == shift
            assert azimuth_shift(truth, truth.rotated(-shift), first, view) == -shift % 8
            assert azimuth_shift(flat, truth, view, first) == shift, (index, k)


@pytest.fixture(scope="module")
def first_view_model():
    """Like the embedded default, every target holds the first view's latent: which view comes
    first changes the output."""
    torch.manual_seed(0)
    return MVDPPModel(dataclasses.replace(preset("tiny"), target_condition=TargetCondition.FIRST_VIEW)).eval()


def test_input_average_averages_each_views_estimate_turned_into_the_first_views_frame(first_view_model, monkeypatch):
    """With 2 views, the masks are the mean of the estimate with view 0 first and the one with
    view 1 first, turned by the azimuth found for view 1, and the colours are the first view's
    estimate's (the photos vote on the shape, the first paints it); so calling with the views
    swapped gives the same masks turned back, painted by the other view. With one view it
    changes nothing."""
    model = first_view_model
    images, masks = object_views(2)
    views = ConditionViews.framed(images, masks)
    swapped = views.reordered([1, 0])
    kwargs = dict(seed=3, steps=2, sampler="ddim", guidance=2.0)
    seen = []
    both = generate(model, views, input_average=True, callback=lambda i, n, x0: seen.append((i, n)), **kwargs)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)], "both estimates report their steps on one count"
    first, second = generate(model, views, **kwargs), generate(model, swapped, **kwargs)
    shift = azimuth_shift(second, first, views.masks[1:], views.masks[:1])
    assert azimuth_shift(first, second, views.masks[:1], views.masks[1:]) == -shift % 8
    torch.testing.assert_close(both.masks, (first.masks + second.rotated(shift).masks) / 2, atol=0, rtol=0)
    torch.testing.assert_close(both.images, first.images, atol=0, rtol=0)
    assert (both.masks - first.masks).abs().max() > 1e-3, "the second estimate must change the output"
    assert (first.images - second.rotated(shift).images).abs().max() > 1e-3, "the estimates' colours must differ"
    from_swapped = generate(model, swapped, input_average=True, **kwargs).rotated(shift)
    torch.testing.assert_close(both.masks, from_swapped.masks, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_swapped.images, second.rotated(shift).images, atol=0, rtol=0)
    # The found turn is applied (two discs are alike from every side, so force one).
    monkeypatch.setattr(pipeline, "azimuth_shift", lambda *args: 3)
    turned = generate(model, views, input_average=True, **kwargs)
    torch.testing.assert_close(turned.masks, (first.masks + second.rotated(3).masks) / 2, atol=0, rtol=0)
    one = ConditionViews.framed(images[:1], masks[:1])
    assert torch.equal(generate(model, one, input_average=True, **kwargs).masks, generate(model, one, **kwargs).masks)
    with pytest.raises(TypeError, match="input_average=1; pass True or False"):
        generate(model, views, steps=1, sampler="ddim", input_average=1)
