"""Benchmark one object's generation (32 views) with the full sd2 model: prints one JSON object.

Random weights in the sd2 shapes (nothing downloaded), bf16, PyTorch SDPA (flash kernel on
CUDA), the DPM-Solver++(2M) sampler with classifier-free guidance (each step one UNet forward
over 2 objects x 33 views), then the 32 decodes. Reports seconds per object and per UNet
forward, peak GPU memory and achieved TFLOP/s against FORWARD_TFLOP per 33-view forward
(the figure tests/bench/bench_unet.py --sd2 uses).

    python tests/bench/bench_generate.py                      # CUDA, 512 px, 25 steps, cfg 3
    python tests/bench/bench_generate.py --image-size 64 --steps 1 --device cpu   # a smoke run

Target: <= 15 s per object on an H100-class GPU (the paper: 181 s with 75 DDPM steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FORWARD_TFLOP = 155.9  # one sd2 UNet forward over 33 views at 64x64 latents (global attention)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from mvdpp_core.condition import ConditionViews
    from mvdpp_core.config import preset
    from mvdpp_core.model import MVDPPModel
    from mvdpp_core.pipeline import generate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2, help="objects timed after one warm-up object")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16: no fp32 copy of the 1.6 G parameters
    model = MVDPPModel(dataclasses.replace(preset("sd2"), image_size=args.image_size)).eval()
    torch.set_default_dtype(previous)
    model.to(args.device)
    model.unet.set_attention_backend("sdpa")
    size = args.image_size
    image = torch.ones(1, 3, size, size)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    image[:, :, mask[0] > 0] = 0.4

    def one() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(
            model, ConditionViews.framed(image, mask), steps=args.steps, sampler="dpmpp_2m", guidance=args.guidance
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    cuda = args.device.startswith("cuda")
    one()  # warm-up: kernels, allocator
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = min(one() for _ in range(args.repeats))
    forwards = args.steps * (2 if args.guidance != 1.0 else 1)  # 33-view forwards (CFG doubles them)
    scale = (size / 512) ** 2  # FLOPs grow about linearly with tokens away from 512 px
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "image_size": size,
        "steps": args.steps,
        "guidance": args.guidance,
        "seconds_per_object": round(seconds, 3),
        "seconds_per_33_view_forward_upper_bound": round(seconds / forwards, 4),
        "achieved_tflops": round(FORWARD_TFLOP * scale * forwards / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
