"""Training-step throughput of the multi-view UNet: prints ONE JSON object.

Times the full step of train_mvdiff.py (MVAE encode of all views, CLIP embeddings, noise,
condition dropout, UNet forward + backward, AdamW step) on random data, after warm-up steps.

    python tests/bench/bench_train.py                        # tiny preset, 64 px, CPU, fp32
    python tests/bench/bench_train.py --preset sd2 --image-size 512 --device cuda \
        --precision bf16 --gradient-checkpointing --batch 1  # the paper's size: 8 targets + 1 condition
    python tests/bench/bench_train.py --batch 64 --targets 6 --steps 1 --count-ops   # the launch count

``--count-ops`` also counts the ATen operations one step dispatches, by phase (each is at least
one kernel launch on a GPU, so a count that grows with the batch marks a launch-bound step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mvdpp_core.config import PredictionType
from train.config import ModelInitConfig, StageConfig
from train.data.dataset import mix_seed
from train.models import build_mvdiff_model
from train.train_mvdiff import TrainedModules, diffusion_loss, encode_views


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched on this thread while active."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, trained, optimizer, batch: dict, empty, stage, precision: str, device) -> dict[str, int]:
    """ATen operations of one training step by phase (the backward's: those run on this thread)."""
    out = {}
    with OpCounter() as c:
        encode_views(model, batch, slice(0, batch["target_rgb"].shape[1] + batch["cond_rgb"].shape[1]),
                     embed=not stage.train_image_encoder)
    out["encode_views"] = c.count
    with OpCounter() as c, torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _ = diffusion_loss(model, trained, batch, empty, stage)
    out["forward"] = c.count
    with OpCounter() as c:
        loss.backward()
    out["backward"] = c.count
    with OpCounter() as c:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out["optimizer"] = c.count
    return out


def random_batch(batch: int, targets: int, conds: int, size: int, step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "target_rgb": torch.rand(batch, targets, 3, size, size, generator=g),
        "target_mask": (torch.rand(batch, targets, 1, size, size, generator=g) > 0.5).float(),
        "target_ids": torch.stack([torch.randperm(32, generator=g)[:targets].sort().values for _ in range(batch)]),
        "cond_rgb": torch.rand(batch, conds, 3, size, size, generator=g),
        "cond_mask": torch.ones(batch, conds, 1, size, size),
        "sample_seed": torch.tensor([mix_seed(step, i) for i in range(batch)]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description="Time training steps of the multi-view UNet.")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=0, help="0 = the preset's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--conds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--count-ops", action="store_true", help="also count the ATen operations of one step by phase")
    args = p.parse_args()
    device = torch.device(args.device)
    model = build_mvdiff_model(ModelInitConfig(preset=args.preset, image_size=args.image_size), PredictionType.EPSILON)
    model.vae.requires_grad_(False)
    model.image_encoder.requires_grad_(False)
    model.to(device)
    model.unet.set_attention_backend("auto")
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=1e-5)
    empty = model.empty_latent(1).detach()
    stage = StageConfig()
    trained = TrainedModules(model.unet)
    size = model.config.image_size
    times = []
    for step in range(args.warmup + args.steps):
        batch = {
            k: v.to(device) if k != "sample_seed" else v
            for k, v in random_batch(args.batch, args.targets, args.conds, size, step).items()
        }
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss, _ = diffusion_loss(model, trained, batch, empty, stage)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    result = {
        "bench": "train_mvdiff_step",
        "preset": args.preset,
        "image_size": size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch_objects": args.batch,
        "views_per_object": args.targets + args.conds,
        "unet_params_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 2),
        "steps_per_s": round(len(timed) / sum(timed), 3),
        "s_per_step_median": round(sorted(timed)[len(timed) // 2], 4),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # the CPU may be shared: read steps_per_s with it
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if args.count_ops:
        batch = {k: v.to(device) if k != "sample_seed" else v
                 for k, v in random_batch(args.batch, args.targets, args.conds, size, 0).items()}
        result["ops_per_step"] = count_ops(model, trained, optimizer, batch, empty, stage, args.precision, device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
