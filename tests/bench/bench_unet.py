"""Benchmark the multi-view UNet's attention: prints one JSON object.

Tiny UNet, 16x16 latents, v in {5, 9, 17, 33} views, one forward with CFG batching (2
objects): wall time and peak memory for global attention with PyTorch SDPA's flash kernel,
with its math kernel, and for per-view attention. Each measurement runs in a fresh
subprocess; peak memory is the process's peak RSS during the forwards minus its RSS just
before them, with glibc told to mmap every allocation over 64 KiB so that freed tensors
leave the RSS at once (else the allocator's caching blurs the figure).
Also: the overhead of a full sampling loop over its raw UNet calls.

    python tests/bench/bench_unet.py            # CPU figures (the targets below)
    python tests/bench/bench_unet.py --sd2      # + the sd2 preset at 33 views, bf16 (needs CUDA)

Targets: mem(33)/mem(17) <= 2.0 (flash); math/flash memory at v=33 >= 5; global/per-view
time at v=33 <= 3; sampling loop <= 1.05 x its UNet calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VIEWS = (5, 9, 17, 33)
MODES = ("flash", "math", "per_view")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(mode: str, v: int, repeats: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mvdpp_core.config import preset
    from mvdpp_core.unet import MultiViewUNet

    torch.manual_seed(0)
    unet = MultiViewUNet(preset("tiny").unet).eval()
    unet.set_attention_backend("sdpa", global_attention=mode != "per_view")
    x = torch.randn(2, v, 9, 16, 16)
    t = torch.tensor([500, 500])
    ids = torch.arange(v).expand(2, v)
    ctx = torch.randn(2, 1, 32)
    kernel = SDPBackend.MATH if mode == "math" else SDPBackend.FLASH_ATTENTION
    with torch.no_grad(), sdpa_kernel(kernel):
        unet(x[:, :2], t, ids[:, :2], ctx)  # warm up kernels at a small size
        base = _current_rss_mb()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            unet(x, t, ids, ctx)
            times.append(time.perf_counter() - start)
    return {"mode": mode, "views": v, "seconds": min(times), "peak_mb": _peak_rss_mb() - base}


def sampling_overhead(steps: int = 4) -> dict:
    """Time generate()'s sampler loop against the sum of its UNet calls."""
    import torch

    from mvdpp_core import pipeline
    from mvdpp_core.config import preset
    from mvdpp_core.model import MVDPPModel

    torch.manual_seed(0)
    model = MVDPPModel(preset("tiny")).eval()
    unet_seconds = []
    forward = model.unet.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        unet_seconds.append(time.perf_counter() - start)
        return out

    model.unet.forward = timed_forward
    loop_seconds = []
    sampler = pipeline.get_sampler("dpmpp_2m")

    def timed_sampler(*args, **kwargs):
        start = time.perf_counter()
        out = sampler(*args, **kwargs)
        loop_seconds.append(time.perf_counter() - start)
        return out

    pipeline.get_sampler = lambda name: timed_sampler
    images = torch.ones(1, 3, 64, 64)
    masks = torch.zeros(1, 64, 64)
    masks[:, 16:48, 16:48] = 1
    pipeline.generate(model, images, masks, steps=steps, sampler="dpmpp_2m")
    return {"steps": steps, "loop_seconds": loop_seconds[0], "unet_seconds": sum(unet_seconds),
            "overhead_ratio": loop_seconds[0] / sum(unet_seconds)}


def sd2_gpu() -> dict:
    """The sd2 preset (random weights), 33 views x 64x64 latents, bf16, one CFG-free forward."""
    import torch

    from mvdpp_core.config import preset
    from mvdpp_core.unet import MultiViewUNet

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    unet = MultiViewUNet(preset("sd2").unet).cuda().to(torch.bfloat16).eval()
    x = torch.randn(1, 33, 9, 64, 64, device="cuda", dtype=torch.bfloat16)
    t, ids = torch.tensor([500], device="cuda"), torch.arange(33, device="cuda")[None]
    ctx = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            unet(x, t, ids, ctx)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        n = 5
        for _ in range(n):
            unet(x, t, ids, ctx)
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / n
    tflop = 155.9  # per forward, counted for this shape
    return {"seconds_per_forward": seconds, "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "tflops_achieved": tflop / seconds, "device": torch.cuda.get_device_name()}


def run_worker(mode: str, v: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", mode, str(v), "--repeats", str(repeats)],
        check=True, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "VIEWS"))
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per row (the minimum is kept)")
    parser.add_argument("--sd2", action="store_true", help="also measure the sd2 preset on CUDA")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    # The math kernel is measured for memory; one repeat of its slow forward is enough.
    rows = [run_worker(mode, v, 1 if mode == "math" else args.repeats) for v in VIEWS for mode in MODES]
    at = {(r["mode"], r["views"]): r for r in rows}
    figures = {
        "mem_ratio_flash_33_over_17": at["flash", 33]["peak_mb"] / at["flash", 17]["peak_mb"],
        "mem_ratio_math_over_flash_33": at["math", 33]["peak_mb"] / at["flash", 33]["peak_mb"],
        "time_ratio_global_over_per_view_33": at["flash", 33]["seconds"] / at["per_view", 33]["seconds"],
    }
    overhead = sampling_overhead()
    targets = {
        "mem_linear_in_views": figures["mem_ratio_flash_33_over_17"] <= 2.0,
        "flash_saves_memory_5x": figures["mem_ratio_math_over_flash_33"] >= 5.0,
        "global_costs_at_most_3x": figures["time_ratio_global_over_per_view_33"] <= 3.0,
        "sampling_overhead_at_most_5pct": overhead["overhead_ratio"] <= 1.05,
    }
    result = {"device": "cpu", "rows": rows, "figures": figures, "sampling": overhead, "targets_met": targets}
    if args.sd2:
        result["sd2_gpu"] = sd2_gpu()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
