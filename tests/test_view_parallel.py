"""View-parallel global attention: one object's views split over 2 gloo ranks give the
same outputs, loss and gradients as all views in one process."""

import pytest
import torch
from spawn_ranks import run_ranks
from view_parallel_worker import WORLD, loss_and_grads, model_and_inputs, rank_main


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    results = run_ranks(rank_main, tmp_path, WORLD, timeout=300)
    for r in results:
        r["grads"] = {k.removeprefix("grad."): v for k, v in r.items() if k.startswith("grad.")}
    out, loss, grads = loss_and_grads(*model_and_inputs())
    torch.testing.assert_close(torch.cat([r["out"] for r in results], dim=1), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0]["loss"], loss, atol=1e-4, rtol=1e-5)
    assert grads.keys() == results[0]["grads"].keys()
    for name, g in grads.items():
        torch.testing.assert_close(results[0]["grads"][name], g, atol=1e-4, rtol=1e-3, msg=name)
    # Without the gather, each rank attends only to its own views: the outputs differ.
    unet, sample, target, t, ids, ctx = model_and_inputs()
    with torch.no_grad():
        alone = unet(sample[:, :3], t, ids[:, :3], ctx)
    assert (alone - out[:, :3]).abs().max() > 1e-3
