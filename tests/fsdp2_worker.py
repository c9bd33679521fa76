"""Worker side of tests/test_fsdp2.py: the recipe's FSDP2 path on 2 gloo CPU ranks.

accelerate runs FSDP only on accelerators (on a CPU it falls back to DDP), so the ranks call
accelerate's own FSDP2 functions directly with a stand-in for the Accelerator: the wrapping
(``fsdp2_prepare_model`` with the policy of ``train/accelerate/8gpu_fsdp2.yaml``), the sharded
model / optimizer checkpoint (``save_fsdp_model`` ...) that ``Accelerator.save_state`` calls
under FSDP2, and the recipe's own EMA and export code.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file

from mvdpp_core.config import preset
from mvdpp_core.model import MVDPPModel

WORLD = 2
REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "train" / "accelerate" / "8gpu_fsdp2.yaml"
EMA_DECAY = 0.5


def build(checkpointing: bool = False):
    """Seeded tiny model, its ``TrainedModules`` (what train_mvdiff shards) and the batch of 2 objects;
    ``checkpointing``: gradient checkpointing on, as the GPU stage configs have it."""
    from train.train_mvdiff import TrainedModules

    torch.manual_seed(0)
    model = MVDPPModel(preset("tiny"))
    with torch.no_grad():
        model.unet.unet.class_embedding.scale.fill_(0.5)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(1)
    batch = {
        "sample": torch.randn(2, 3, 9, 8, 8, generator=g),
        "target": torch.randn(2, 3, 4, 8, 8, generator=g),
        "t": torch.tensor([700, 100]),
        "ids": torch.tensor([[0, 5, 32], [3, 9, 32]]),
        "ctx": torch.randn(2, 1, 32, generator=g),
    }
    return model, TrainedModules(model.unet), batch


def step(module, optimizer, ema, batch: dict, rows: slice, step_index: int) -> torch.Tensor:
    """One optimisation step of the recipe (loss, backward, clip, AdamW, EMA) on ``rows`` of the batch."""
    out = module(batch["sample"][rows], batch["t"][rows], batch["ids"][rows], batch["ctx"][rows], None, None, None)
    loss = (out - batch["target"][rows]).pow(2).mean()
    return _finish_step(module, optimizer, ema, loss, step_index)


def view_step(module, optimizer, ema, batch: dict, views: slice, group, step_index: int) -> torch.Tensor:
    """The same step under view parallelism: this rank holds ``views`` of both objects, and its
    loss is its views' part of the object loss times the group size, as ``diffusion_loss``
    computes it (FSDP2 averages the gradients over the ranks: their sum, the whole objects')."""
    out = module(
        batch["sample"][:, views], batch["t"], batch["ids"][:, views], batch["ctx"], None, None, None,
        view_group=group,
    )
    per_view = (out - batch["target"][:, views]).pow(2).mean(dim=(2, 3, 4))  # b own
    loss = WORLD * per_view.sum(dim=1).mean() / batch["ids"].shape[1]
    return _finish_step(module, optimizer, ema, loss, step_index)


def _finish_step(module, optimizer, ema, loss: torch.Tensor, step_index: int) -> torch.Tensor:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 0.05)  # small: clipping is active
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(step_index)
    return loss.detach()


def optimiser_and_ema(module):
    from train.config import EMAConfig, OptimConfig
    from train.loop import EMA, make_optimizer

    optimizer, _ = make_optimizer(list(module.parameters()), OptimConfig(lr=1e-2, eps=1e-6))
    return optimizer, EMA(module, EMAConfig(decay=EMA_DECAY, warmup=False))


def plugin_from_config():
    """accelerate's FSDP plugin from the recipe's accelerate config file."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    cfg = yaml.safe_load(FSDP_CONFIG.read_text())["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=cfg["fsdp_version"],
        auto_wrap_policy=cfg["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=cfg["fsdp_transformer_layer_cls_to_wrap"].split(","),
        reshard_after_forward=cfg["fsdp_reshard_after_forward"],
        state_dict_type=cfg["fsdp_state_dict_type"],
    )


def sharded(rank: int, checkpointing: bool = False):
    """A fresh model sharded exactly as ``acc.prepare`` shards it under the recipe's FSDP2 config."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = plugin_from_config()
    acc = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, device=torch.device("cpu"),
        mixed_precision="no", is_main_process=rank == 0, num_processes=WORLD, process_index=rank, is_fsdp2=True,
        wait_for_everyone=dist.barrier,
    )
    model, trained, batch = build(checkpointing)
    return model, fsdp2_prepare_model(acc, trained), batch, plugin, acc


def full_params(module) -> dict[str, torch.Tensor]:
    """Gathered parameters (a collective)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in module.named_parameters()
    }


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    from accelerate import PartialState
    from accelerate.utils.fsdp_utils import load_fsdp_model, save_fsdp_model, save_fsdp_optimizer

    from train.loop import load_fsdp2_optimizers
    from train.models import export_bundle

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    PartialState(cpu=True)  # accelerate's logging (inside its checkpoint functions) needs a state
    out = Path(out_dir)
    mine = slice(rank, rank + 1)  # data parallel: one object per rank
    model, module, batch, plugin, acc = sharded(rank)
    optimizer, ema = optimiser_and_ema(module)
    results = {"sharded_params": torch.tensor(float(sum(hasattr(p, "full_tensor") for p in module.parameters())))}
    loss1 = step(module, optimizer, ema, batch, mine, 1)
    results["params1"] = full_params(module)
    ckpt = out / "ckpt"
    save_fsdp_model(plugin, acc, module, str(ckpt))
    save_fsdp_optimizer(plugin, acc, optimizer, module, str(ckpt))
    ema_state = ema.full_state_dict()
    loss2 = step(module, optimizer, ema, batch, mine, 2)
    results["params2"] = full_params(module)
    results["ema2"] = ema.full_state_dict()

    # Resume into a freshly built and sharded model, as a restarted run does.
    model, module, batch, plugin, acc = sharded(rank)
    optimizer, ema = optimiser_and_ema(module)
    load_fsdp_model(plugin, acc, module, str(ckpt))  # what acc.load_state does for the model...
    acc._optimizers = [optimizer]
    load_fsdp2_optimizers(acc, module, ckpt)  # ...and the recipe's loader for the optimizer
    ema.load_full_state_dict(ema_state)
    loss2_resumed = step(module, optimizer, ema, batch, mine, 2)
    results["params2_resumed"] = full_params(module)
    weights = ema.full_state_dict()  # export: full tensors gathered on every rank
    if rank == 0:
        export_bundle(model, weights, out / "export.safetensors", "stage1")
    losses = torch.stack([loss1, loss2, loss2_resumed])
    dist.all_reduce(losses)
    results["losses"] = losses / WORLD
    _save(results, rank, out_dir)


def rank_main_views(rank: int, init_file: str, out_dir: str) -> None:
    """FSDP2 with a view group of both ranks (``parallel.view_group_size=2`` on 2 processes): each
    rank holds both objects, and its share of their 3 views (1 and 2, ``ViewShards``); gradient
    checkpointing on (the blocks' recomputation in backward gathers the views again)."""
    from mvdpp_core.attention import ViewShards
    from train.view_parallel import view_shares

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, module, batch, plugin, acc = sharded(rank, checkpointing=True)
    optimizer, ema = optimiser_and_ema(module)
    shares = view_shares(batch["ids"].shape[1], WORLD)
    group = ViewShards(dist.group.WORLD, tuple(s.stop - s.start for s in shares))
    losses = []
    results = {}
    for index in (1, 2):
        losses.append(view_step(module, optimizer, ema, batch, shares[rank], group, index))
        results[f"params{index}"] = full_params(module)
    losses = torch.stack(losses)
    dist.all_reduce(losses)
    results["losses"] = losses / WORLD
    results["ema2"] = ema.full_state_dict()
    _save(results, rank, out_dir)


def _save(results: dict, rank: int, out_dir: str) -> None:
    flat = {
        f"{group}.{k}" if isinstance(v, dict) else group: t
        for group, v in results.items()
        for k, t in (v.items() if isinstance(v, dict) else [(None, v)])
    }
    save_file({k: v.contiguous() for k, v in flat.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()
