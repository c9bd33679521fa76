"""Worker side of tests/test_view_parallel.py.

A module of its own (not the test file) because spawned ranks import their target by
module name, and a test module's name under pytest's importlib mode is not importable.
"""

import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mvdpp_core.config import preset

VIEWS, WORLD = 6, 2


def model_and_inputs():
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


def loss_and_grads(unet, sample, target, t, ids, ctx, group=None):
    out = unet(sample, t, ids, ctx, view_group=group)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    unet, sample, target, t, ids, ctx = model_and_inputs()
    mine = slice(rank * VIEWS // WORLD, (rank + 1) * VIEWS // WORLD)
    out, loss, grads = loss_and_grads(unet, sample[:, mine], target[:, mine], t, ids[:, mine], ctx, dist.group.WORLD)
    dist.all_reduce(loss)
    for g in grads.values():  # what DDP does: sum the ranks' gradients
        dist.all_reduce(g)
    tensors = {"out": out, "loss": loss, **{f"grad.{n}": g for n, g in grads.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()
