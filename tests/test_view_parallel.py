"""View-parallel global attention: one object's views split over 2 gloo ranks give the
same outputs, loss and gradients as all views in one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mvdpp_core.config import preset

VIEWS, WORLD = 6, 2


def _model_and_inputs():
    from mvdpp_core.unet import MultiViewUNet

    torch.manual_seed(0)
    unet = MultiViewUNet(preset("tiny").unet)
    with torch.no_grad():
        unet.unet.class_embedding.scale.fill_(0.5)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, VIEWS, 9, 8, 8, generator=g)
    target = torch.randn(1, VIEWS, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 2, 32, generator=g)
    return unet, sample, target, torch.tensor([700]), torch.arange(VIEWS)[None], ctx


def _loss_and_grads(unet, sample, target, t, ids, ctx, group=None):
    out = unet(sample, t, ids, ctx, view_group=group)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    unet, sample, target, t, ids, ctx = _model_and_inputs()
    mine = slice(rank * VIEWS // WORLD, (rank + 1) * VIEWS // WORLD)
    out, loss, grads = _loss_and_grads(unet, sample[:, mine], target[:, mine], t, ids[:, mine], ctx, dist.group.WORLD)
    dist.all_reduce(loss)
    for g in grads.values():  # what DDP does: sum the ranks' gradients
        dist.all_reduce(g)
    tensors = {"out": out, "loss": loss, **{f"grad.{n}": g for n, g in grads.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    results = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for r in results:
        r["grads"] = {k.removeprefix("grad."): v for k, v in r.items() if k.startswith("grad.")}
    out, loss, grads = _loss_and_grads(*_model_and_inputs())
    torch.testing.assert_close(torch.cat([r["out"] for r in results], dim=1), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0]["loss"], loss, atol=1e-4, rtol=1e-5)
    assert grads.keys() == results[0]["grads"].keys()
    for name, g in grads.items():
        torch.testing.assert_close(results[0]["grads"][name], g, atol=1e-4, rtol=1e-3, msg=name)
    # Without the gather, each rank attends only to its own views: the outputs differ.
    unet, sample, target, t, ids, ctx = _model_and_inputs()
    with torch.no_grad():
        alone = unet(sample[:, :3], t, ids[:, :3], ctx)
    assert (alone - out[:, :3]).abs().max() > 1e-3
