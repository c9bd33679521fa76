"""View-parallel global attention: one object's views split over 2 gloo ranks give the
same outputs, loss and gradients as all views in one process, with the plain model and with
every global attention option on (geometry encoding, cosine attention, the epipolar and
condition-key biases, built over every rank's views, and log-length scaling, over every rank's
keys)."""

import pytest
import torch
from spawn_ranks import run_ranks
from view_parallel_worker import (
    BIASED_COUNTS,
    WORLD,
    loss_and_grads,
    model_and_inputs,
    rank_main,
    rank_main_biased,
    rank_main_biased_equal,
)

CASES = {  # (the biased model?, the ranks' entry point, which picks their shares, the first rank's views)
    "plain": (False, rank_main, 3),
    "biases-unequal-shares": (True, rank_main_biased, BIASED_COUNTS[0]),
    "biases-equal-shares": (True, rank_main_biased_equal, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(tmp_path, case):
    biased, rank_main_of_case, first = CASES[case]
    results = run_ranks(rank_main_of_case, tmp_path, WORLD, timeout=300)
    for r in results:
        r["grads"] = {k.removeprefix("grad."): v for k, v in r.items() if k.startswith("grad.")}
    out, loss, grads = loss_and_grads(*model_and_inputs(biased))
    torch.testing.assert_close(torch.cat([r["out"] for r in results], dim=1), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0]["loss"], loss, atol=1e-4, rtol=1e-5)
    assert grads.keys() == results[0]["grads"].keys()
    for name, g in grads.items():
        torch.testing.assert_close(results[0]["grads"][name], g, atol=1e-4, rtol=1e-3, msg=name)
    # Without the gather, each rank attends only to its own views: the outputs differ.
    unet, sample, target, t, ids, ctx = model_and_inputs(biased)
    with torch.no_grad():
        alone = unet(sample[:, :first], t, ids[:, :first], ctx)
    assert (alone - out[:, :first]).abs().max() > 1e-3


@torch.no_grad()
def test_the_biases_matter_in_the_split_model():
    """The biased model's outputs depend on its gains and its log-length scaling (so the split test
    above checks them): with the epipolar and condition-key gains at 0, then without the scaling,
    the same inputs give other outputs."""
    unet, sample, _, t, ids, ctx = model_and_inputs(biased=True)
    with_biases = unet(sample, t, ids, ctx)
    for gains in (unet.epipolar, unet.condition_bias):
        gains.reset_parameters(0.0)
        assert (unet(sample, t, ids, ctx) - with_biases).abs().max() > 1e-3
        with_biases = unet(sample, t, ids, ctx)
    for processor in unet.unet.attn_processors.values():
        processor.length_reference = 0
    assert (unet(sample, t, ids, ctx) - with_biases).abs().max() > 1e-3
