"""Worker side of tests/test_sd2_cpu.py: each check runs in a fresh process of its own, so its
peak memory (ru_maxrss) is its own and the memory is returned when it ends."""

from __future__ import annotations

import contextlib
import json
import resource
import time

import torch

GIB = 2**30


def bf16_supported() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 / AMX); else the test runs in fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build weights directly in ``dtype``: an fp32 copy of the sd2 model alone is 6.3 GB."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def sd2_forward_and_generate(out_file: str) -> None:
    """The full sd2 model (random weights): one UNet forward over 1 condition + 2 target views
    at 64x64 latents, and one generate step (32 + 1 views) at 64 px images (8x8 latents)."""
    import dataclasses

    from mvdpp_core.condition import ConditionViews
    from mvdpp_core.config import preset
    from mvdpp_core.model import MVDPPModel
    from mvdpp_core.pipeline import generate

    torch.set_grad_enabled(False)
    dtype = torch.bfloat16 if bf16_supported() else torch.float32
    torch.manual_seed(0)
    with default_dtype(dtype):
        model = MVDPPModel(preset("sd2")).eval()
    parts = ("unet", "vae", "image_encoder")
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in parts}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        model.unet.unet.class_embedding.scale.fill_(0.5)  # the view ids take part
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 3, 9, 64, 64, generator=g).to(dtype)  # 2 targets + 1 condition view
    start = time.perf_counter()
    out = model.unet(sample, torch.tensor([500]), torch.tensor([[0, 9, 32]]), torch.randn(1, 1, 1024).to(dtype))
    forward_s = time.perf_counter() - start

    small = MVDPPModel(
        dataclasses.replace(model.config, image_size=64), unet=model.unet, vae=model.vae,
        image_encoder=model.image_encoder,
    )
    image = torch.ones(1, 3, 64, 64)
    image[:, :, 16:48, 16:48] = torch.tensor([0.8, 0.3, 0.2])[:, None, None]
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    start = time.perf_counter()
    result = generate(small, ConditionViews.framed(image, mask), steps=1, sampler="ddim", guidance=1.0)
    generate_s = time.perf_counter() - start
    report = {
        "dtype": str(dtype), "params": counts, "weight_bytes": weight_bytes,
        "out_shape": list(out.shape), "out_finite": bool(torch.isfinite(out).all()),
        "out_std": out.float().std().item(),
        "images_shape": list(result.images.shape), "masks_shape": list(result.masks.shape),
        "result_finite": bool(torch.isfinite(result.images).all() and torch.isfinite(result.masks).all()),
        "forward_s": forward_s, "generate_s": generate_s, "peak_rss_bytes": peak_rss_bytes(),
    }
    with open(out_file, "w") as f:
        json.dump(report, f)


def sd2_convert_round_trip(folder: str, out_file: str) -> None:
    """A full-size SD 2 inpainting folder (random UNet + VAE, save_pretrained), converted by
    ``convert_sd2_inpainting``: per view, the converted model reproduces the base."""
    from pathlib import Path

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from mvdpp_core.checkpoint import convert_sd2_inpainting
    from mvdpp_core.config import preset

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    sd2 = preset("sd2")
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 9, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    ctx = torch.randn(1, 1, 1024, generator=g)
    image = torch.rand(2, 3, 64, 64, generator=g)
    # The base: reference outputs first, then saved and freed (one full UNet in memory at a time).
    unet = UNet2DConditionModel(**sd2.unet.diffusers_kwargs()).eval()
    ref = unet(sample, t, encoder_hidden_states=ctx.expand(2, 1, 1024)).sample
    unet.save_pretrained(Path(folder) / "unet")
    del unet
    vae = AutoencoderKL(**{**sd2.vae.diffusers_kwargs(), "in_channels": 3, "out_channels": 3}).eval()
    ref_latents = vae.encode(image * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
    ref_decoded = vae.decode(ref_latents / vae.config.scaling_factor).sample
    vae.save_pretrained(Path(folder) / "vae")
    del vae

    model = convert_sd2_inpainting(folder, image_size=512).eval()
    model.unet.set_attention_backend("sdpa", global_attention=False)  # per view: the base's own attention
    ours = model.unet(sample[None], t[None], torch.tensor([[0, 32]]), ctx)[0]
    latents = model.vae.encode(image, torch.ones(2, 1, 64, 64))
    rgb, decoded_mask = model.vae.decode(latents)
    report = {
        "unet_params": sum(p.numel() for p in model.unet.parameters()),
        "unet_max_diff": (ours - ref).abs().max().item(), "unet_ref_scale": ref.abs().max().item(),
        "latent_max_diff": (latents - ref_latents).abs().max().item(),
        "rgb_max_diff": (rgb - ((ref_decoded + 1) / 2).clamp(0, 1)).abs().max().item(),
        "mask_min": decoded_mask.min().item(), "config_unet": json.loads(model.config.to_json())["unet"],
        "peak_rss_bytes": peak_rss_bytes(),
    }
    with open(out_file, "w") as f:
        json.dump(report, f)
