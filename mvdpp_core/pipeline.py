"""One call from 1-10 condition photos (+ masks) to 32 views and masks on the rig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from .cameras import NUM_TARGET_VIEWS, mirrored_view_order
from .common import composite_on_white, parse_enum
from .condition import ConditionViews, MaskConvention, encode_views, frame_condition
from .inputs import DEFAULT_FILL, MAX_SEED, check_average_seeds, check_guidance, check_seed
from .model import Condition, MVDPPModel
from .samplers import Denoiser, Sampler, SamplerName, StepCallback, get_sampler
from .schedule import TimestepSpacing

DECODE_CHUNK = 8
MASK_WEIGHT_FLOOR = 1e-3  # MultiViewResult.mean: background pixels average plainly
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

    def on_white(self) -> Tensor:
        """The views composited on white through their masks, (32, 3, H, W)."""
        return composite_on_white(self.images, self.masks)

    def for_reconstruction(self) -> tuple[Tensor, Tensor]:
        """What ``mvdpp_core.reconstruction.reconstruct`` takes, in the channels-last layout of
        the boundary between generation and reconstruction: views (32, H, W, 3) and masks
        (32, H, W) (the masks decide what is object): ``reconstruct(*result.for_reconstruction())``."""
        return rearrange(self.images, "v c h w -> v h w c"), rearrange(self.masks, "v 1 h w -> v h w")

    def mirrored(self) -> MultiViewResult:
        """The 32 views of the mirrored object (reflected across the vertical plane of the
        azimuth-0 camera): each view flipped left-right, in the slot of azimuth -a."""
        order = mirrored_view_order()
        return MultiViewResult(self.images[order].flip(-1), self.masks[order].flip(-1))

    @staticmethod
    def mean(results: list[MultiViewResult]) -> MultiViewResult:
        """The mean of results: masks averaged, colours weighted by the masks (where none holds
        the object, the plain mean), so a view's colour is not diluted by another result's
        background. The order of the results does not matter; one result is returned as it is."""
        if len(results) == 1:
            return results[0]
        weights = [r.masks + MASK_WEIGHT_FLOOR for r in results]
        images = sum(r.images * w for r, w in zip(results, weights, strict=True)) / sum(weights)
        return MultiViewResult(images, sum(r.masks for r in results) / len(results))


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
    images: Tensor | ConditionViews,
    masks: Tensor | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    sampler: SamplerName | str = SamplerName.DDPM,
    guidance: float = 3.0,
    embeddings: Tensor | None = None,
    mask_convention: MaskConvention | str = MaskConvention.FOREGROUND,
    background_tolerance: float = 0.1,
    object_fill: float = DEFAULT_FILL,
    callback: StepCallback | None = None,
    mirror_average: bool = False,
    average_seeds: int = 1,
) -> MultiViewResult:
    """Generate the 32 rig views of the object shown in 1-10 condition views.

    Args:
        images: (n, 3, H, W) RGB or (n, 4, H, W) RGBA in [0, 1]; the first image defines
            azimuth 0. They are framed by ``mvdpp_core.condition.frame_condition`` (masks,
            alpha or a plain backdrop; recentred as in training), exactly as the ComfyUI node
            frames them. Views framed already (training renders, the node's output) come as
            ``ConditionViews`` (e.g. ``ConditionViews.framed(images, masks)``) and are used as
            they are.
        masks: optional (n, H, W) or (n, 1, H, W) masks in [0, 1], read by ``mask_convention``
            (default 1 = object).
        seed: noise seed; the result is deterministic for a seed on CPU.
        steps: sampling steps (default: 75 DDPM as in the paper, 50 DDIM, 25 DPM-Solver++).
        sampler: 'ddpm', 'ddim' or 'dpmpp_2m'.
        guidance: classifier-free guidance scale on the condition (1 = off).
        embeddings: (n, d) CLIP image embeddings instead of the bundled image encoder.
        background_tolerance, object_fill: see ``frame_condition``.
        callback: ``callback(step, total, x0)`` after each step; raise from it to cancel.
        mirror_average: also generate from the left-right flipped condition views (the same
            photos of the mirrored object, same noise), mirror those 32 views back
            (``MultiViewResult.mirrored``) and average the results. The task is symmetric
            under this reflection and a trained model only nearly so: the average makes the
            output exactly equivariant to mirroring the input.
        average_seeds: average the views generated from this many noise seeds (``seed``,
            ``seed + 1``, ...; each also mirrored with ``mirror_average``), 1 to 16. Averaged
            estimates are closer to the answer wherever a sampler returns a mean-like estimate
            (the embedded default's 2 ddim steps: README). Each pass costs one generation; the
            callback counts the steps of all passes on one scale. Both are off by default: the
            samples of a many-step stochastic sampler may differ in detail, and their average
            blurs it.
    """
    # Every argument is checked before any work, so a mistake costs no encoding or UNet step.
    if not all(hasattr(model, a) for a in ("schedule", "encode_condition", "config")):  # duck-typed: the
        # node pack may import this package under another name, giving MVDPPModel a second identity
        raise TypeError(
            f"model is a {type(model).__name__}, not an MVDPPModel; load one with "
            "mvdpp_core.load_checkpoint('path/to/model.safetensors')."
        )
    sampler = parse_enum(SamplerName, sampler, "sampler")
    sample_fn = get_sampler(sampler)
    default_steps, spacing = SAMPLER_DEFAULTS[sampler]
    ts = model.schedule.timesteps(default_steps if steps is None else steps, spacing)
    seed, guidance = check_seed(seed), check_guidance(guidance)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is not callable; pass a function (step, total, x0) or None.")
    if not isinstance(mirror_average, bool):
        raise TypeError(f"mirror_average={mirror_average!r}; pass True or False.")
    average_seeds = check_average_seeds(average_seeds)
    views = images if is_framed(images) else frame_condition(
        images, masks, size=model.config.image_size, mask_convention=mask_convention,
        background_tolerance=background_tolerance, fill=object_fill, embeddings=embeddings,
    )
    mirrored_views = views.mirrored() if mirror_average else None  # refuses outside embeddings before any step
    sides = (False, True) if mirror_average else (False,)
    passes = [(k, mirrored) for k in range(average_seeds) for mirrored in sides]
    results = []
    for j, (k, mirrored) in enumerate(passes):
        result = _sample(model, mirrored_views if mirrored else views, (seed + k) % (MAX_SEED + 1), ts, sample_fn,
                         guidance, _pass_callback(callback, j, len(passes)))
        results.append(result.mirrored() if mirrored else result)
    return MultiViewResult.mean(results)


def _pass_callback(callback: StepCallback | None, index: int, passes: int) -> StepCallback | None:
    """The callback of pass ``index`` of ``passes`` sampling passes of n steps each, counting
    steps 1 .. passes * n in all."""
    if callback is None:
        return None
    return lambda i, n, x0: callback(index * n + i, passes * n, x0)


def _sample(model: MVDPPModel, views: ConditionViews, seed: int, ts: Tensor, sample_fn: Sampler, guidance: float,
            callback: StepCallback | None) -> MultiViewResult:
    """One sampling pass from framed condition views: encode, denoise from the seed's noise, decode."""
    vae_dtype = model.vae_dtype
    cond = encode_views(model, views)
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


def is_framed(views: object) -> bool:
    """True for ``ConditionViews`` (duck-typed: the node pack may import this package under another name)."""
    return not isinstance(views, Tensor) and all(hasattr(views, a) for a in ("images", "masks", "embeddings"))


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
