"""Worker side of tests/test_view_parallel.py.

A module of its own (not the test file) because spawned ranks import their target by
module name, and a test module's name under pytest's importlib mode is not importable.
"""

import dataclasses
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mvdpp_core.attention import ViewShards
from mvdpp_core.config import preset

VIEWS, WORLD = 6, 2
# The biased model's object: 6 rig views and 2 condition views, split 3 + 5 over the ranks
# (unequal shares, ``ViewShards``, the condition views on the last rank as train/view_parallel.py
# lays them out) or 4 + 4 (equal shares over a plain process group).
BIASED_IDS = [0, 9, 17, 3, 26, 12, 32, 33]
BIASED_COUNTS = (3, 5)


def model_and_inputs(biased: bool = False):
    """The tiny UNet and one object's inputs; ``biased``: with every global attention option on (the
    geometry encoding, cosine attention, the epipolar and condition-key biases at gain 1, log-length
    scaling at a reference of 3 views), over ``BIASED_IDS``."""
    from mvdpp_core.unet import MultiViewUNet

    torch.manual_seed(0)
    config = preset("tiny").unet
    if biased:
        config = dataclasses.replace(
            config, geometry_encoding=True, cosine_attention=True, epipolar_attention=True,
            condition_attention_bias=True, length_scaled_attention=3,
        )
    unet = MultiViewUNet(config)
    with torch.no_grad():
        unet.unet.class_embedding.scale.fill_(0.5)
    if biased:
        unet.geometry.reset_parameters(0.1)
        unet.epipolar.reset_parameters(1.0)
        unet.condition_bias.reset_parameters(1.0)
    views = len(BIASED_IDS) if biased else VIEWS
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, views, 9, 8, 8, generator=g)
    target = torch.randn(1, views, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 2, 32, generator=g)
    ids = torch.tensor([BIASED_IDS]) if biased else torch.arange(VIEWS)[None]
    return unet, sample, target, torch.tensor([700]), ids, ctx


def loss_and_grads(unet, sample, target, t, ids, ctx, group=None):
    out = unet(sample, t, ids, ctx, view_group=group)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """Equal shares over the world group (a plain process group)."""
    _run_rank(rank, init_file, out_dir, biased=False)


def rank_main_biased(rank: int, init_file: str, out_dir: str) -> None:
    """The biased model, unequal shares (``ViewShards``)."""
    _run_rank(rank, init_file, out_dir, biased=True, counts=BIASED_COUNTS)


def rank_main_biased_equal(rank: int, init_file: str, out_dir: str) -> None:
    """The biased model, equal shares over a plain process group."""
    _run_rank(rank, init_file, out_dir, biased=True)


def _run_rank(rank: int, init_file: str, out_dir: str, biased: bool, counts: tuple[int, ...] | None = None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    unet, sample, target, t, ids, ctx = model_and_inputs(biased)
    if counts is not None:
        start = sum(counts[:rank])
        mine, group = slice(start, start + counts[rank]), ViewShards(dist.group.WORLD, counts)
    else:
        views = ids.shape[1]
        mine, group = slice(rank * views // WORLD, (rank + 1) * views // WORLD), dist.group.WORLD
    out, loss, grads = loss_and_grads(unet, sample[:, mine], target[:, mine], t, ids[:, mine], ctx, group)
    dist.all_reduce(loss)
    for g in grads.values():  # what DDP does: sum the ranks' gradients
        dist.all_reduce(g)
    tensors = {"out": out, "loss": loss, **{f"grad.{n}": g for n, g in grads.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()
