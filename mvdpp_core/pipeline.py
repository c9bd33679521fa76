"""One call from 1-10 condition photos (+ masks) to 32 views and masks on the rig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from .cameras import NUM_TARGET_VIEWS
from .inputs import check_condition_views, check_guidance, check_seed, recenter, resize
from .model import Condition, MVDPPModel
from .samplers import Denoiser, SamplerName, StepCallback, get_sampler
from .schedule import TimestepSpacing

DECODE_CHUNK = 8
# Default steps (DDPM: the paper's 75) and step placement per sampler. Multistep solvers
# are second order only on even log-SNR steps (tests/test_schedule_samplers.py measures it).
SAMPLER_DEFAULTS = {
    SamplerName.DDPM: (75, TimestepSpacing.TRAILING),
    SamplerName.DDIM: (50, TimestepSpacing.TRAILING),
    SamplerName.DPMPP_2M: (25, TimestepSpacing.LOGSNR),
}


@dataclass
class MultiViewResult:
    """images (32, 3, H, W) and masks (32, 1, H, W) in [0, 1], rig order i = e * 8 + a."""

    images: Tensor
    masks: Tensor


def guided_denoiser(model: MVDPPModel, cond: Condition, guidance: float) -> Denoiser:
    """x0-predicting denoiser over all 32 + n views, with classifier-free guidance.

    The conditional and unconditional branches run as one batch of 2 objects.
    """
    empty = model.empty_latent(1).to(model.dtype)
    cond = cond.to(model.device, model.dtype)
    use_cfg = guidance != 1.0
    if use_cfg:
        null = model.null_condition(cond, empty)
        cond = Condition(torch.cat([cond.latents, null.latents]), torch.cat([cond.embeddings, null.embeddings]))
        empty = torch.cat([empty, empty])

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        xb = torch.cat([x, x]) if use_cfg else x  # b v c h w
        tb = t.to(model.device).expand(xb.shape[0]).float()
        out = model.predict(xb.to(model.dtype), tb, cond, empty).to(x.dtype)
        x0 = model.schedule.predict_x0(out, xb, t)
        if not use_cfg:
            return x0
        x0_cond, x0_uncond = x0.chunk(2)
        return x0_uncond + guidance * (x0_cond - x0_uncond)

    return denoise


@torch.no_grad()
def generate(
    model: MVDPPModel,
    images: Tensor,
    masks: Tensor,
    *,
    seed: int = 0,
    steps: int | None = None,
    sampler: SamplerName | str = SamplerName.DDPM,
    guidance: float = 3.0,
    embeddings: Tensor | None = None,
    recenter_inputs: bool = True,
    callback: StepCallback | None = None,
) -> MultiViewResult:
    """Generate the 32 rig views of the object shown in 1-10 condition views.

    Args:
        images: (n, 3, H, W) RGB in [0, 1]; the first image defines azimuth 0.
        masks: (n, H, W) or (n, 1, H, W) foreground in [0, 1] (1 = object).
        seed: noise seed; the result is deterministic for a seed on CPU.
        steps: sampling steps (default: 75 DDPM as in the paper, 50 DDIM, 25 DPM-Solver++).
        sampler: 'ddpm', 'ddim' or 'dpmpp_2m'.
        guidance: classifier-free guidance scale on the condition (1 = off).
        embeddings: (n, d) CLIP image embeddings instead of the bundled image encoder.
        recenter_inputs: crop and scale each view so the object is centred at the training
            framing (turn off for views already framed like the training renders).
        callback: ``callback(step, total, x0)`` after each step; raise from it to cancel.
    """
    # Every argument is checked before any work, so a mistake costs no encoding or UNet step.
    if not all(hasattr(model, a) for a in ("schedule", "encode_condition", "config")):  # duck-typed: the
        # node pack may import this package under another name, giving MVDPPModel a second identity
        raise TypeError(
            f"model is a {type(model).__name__}, not an MVDPPModel; load one with "
            "mvdpp_core.load_checkpoint('path/to/model.safetensors')."
        )
    sample_fn = get_sampler(sampler)  # validates the name
    default_steps, spacing = SAMPLER_DEFAULTS[SamplerName(sampler)]
    ts = model.schedule.timesteps(default_steps if steps is None else steps, spacing)
    seed, guidance = check_seed(seed), check_guidance(guidance)
    _check_options(embeddings, recenter_inputs, callback)
    images, masks = check_condition_views(images, masks)
    size = model.config.image_size
    if recenter_inputs:
        images, masks = recenter(images.float(), masks.float(), size)
    else:
        images, masks = resize(images.float(), size), resize(masks.float(), size)
    vae_dtype = model.vae_dtype
    cond = model.encode_condition(
        images.to(model.device, vae_dtype), masks.to(model.device, vae_dtype),
        None if embeddings is None else embeddings.to(model.device),
    )
    denoiser = guided_denoiser(model, cond, guidance)
    generator = torch.Generator().manual_seed(seed)
    latent = model.config.latent_size
    shape = (1, NUM_TARGET_VIEWS + cond.num_views, model.config.vae.latent_channels, latent, latent)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)
    x0 = sample_fn(denoiser, x, model.schedule, ts, generator=generator, callback=callback)
    if not torch.isfinite(x0).all():  # decoding NaN gives 32 blank views: say why instead
        raise ValueError(nonfinite_cause(model, guidance))
    targets = rearrange(x0[:, :NUM_TARGET_VIEWS], "1 v c h w -> v c h w")
    # Decode a few views at a time: 32 full-size decodes at once need tens of GB.
    decoded = [model.vae.decode(chunk.to(vae_dtype)) for chunk in targets.split(DECODE_CHUNK)]
    rgb = torch.cat([d[0] for d in decoded]).float().cpu()
    mask = torch.cat([d[1] for d in decoded]).float().cpu()
    return MultiViewResult(rgb, mask)


def _check_options(embeddings: object, recenter_inputs: object, callback: object) -> None:
    if embeddings is not None and not isinstance(embeddings, Tensor):
        raise TypeError(
            f"embeddings is a {type(embeddings).__name__}; pass a torch tensor (n, d) of CLIP image "
            "embeddings, or None to use the bundled image encoder."
        )
    if not isinstance(recenter_inputs, bool):
        raise TypeError(f"recenter_inputs={recenter_inputs!r} must be True or False.")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is not callable; pass a function (step, total, x0) or None.")


def nonfinite_cause(model: MVDPPModel, guidance: float) -> str:
    """Why sampling produced NaN / inf, most likely cause first (the weights, fp16, the scale)."""
    from .checkpoint import bundle_modules

    for prefix, module in bundle_modules(model).items():
        for name, p in module.named_parameters():
            if not torch.isfinite(p).all():
                return (
                    f"sampling produced NaN/inf because the model's weights are not finite ({prefix}.{name} "
                    "holds NaN or inf): the checkpoint is corrupt or its training diverged. Load another "
                    "checkpoint (or an earlier one of the run)."
                )
    if model.dtype == torch.float16:
        return (
            "sampling produced NaN/inf with finite weights while running in fp16, which overflows in this "
            "model; load it with dtype='bf16' or 'fp32'."
        )
    return (
        f"sampling produced NaN/inf with finite weights and inputs (guidance={guidance}); try guidance 1-7, "
        "another sampler or more steps, and report it if it persists."
    )
