"""One call from 1-10 condition photos (+ masks) to 32 views and masks on the rig."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from .cameras import AZIMUTHS_DEG, NUM_TARGET_VIEWS, mirrored_view_order, rotated_view_order, view_index
from .common import composite_on_white, parse_enum, straight_colours
from .condition import ConditionViews, MaskConvention, encode_views, frame_condition
from .inputs import DEFAULT_FILL, MAX_SEED, check_average_seeds, check_guidance, check_seed, recenter
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
    """images (32, 3, H, W) and masks (32, 1, H, W) in [0, 1], rig order i = e * 8 + a. The
    images hold the object's own colours (straight alpha, as an RGBA PNG or a ComfyUI IMAGE with
    its MASK): ``on_white()`` composites them once."""

    images: Tensor
    masks: Tensor

    def on_white(self) -> Tensor:
        """The views composited on white through their masks, (32, 3, H, W)."""
        return composite_on_white(self.images, self.masks)

    def for_reconstruction(self) -> tuple[Tensor, Tensor]:
        """What ``mvdpp_core.reconstruction.reconstruct`` takes, in the channels-last layout of
        the boundary between generation and reconstruction: the views on white through their
        masks (32, H, W, 3), as the grid shows them, and the masks (32, H, W), which decide what
        is object: ``reconstruct(*result.for_reconstruction())``. On white, a view's colours end
        where its mask does. Averaged results (``mean``) carry one estimate's object colour
        where the averaged mask says backdrop, and the reconstruction's colour snap would grow
        the masks into it (docs/embedded_default.md, "More than one input view")."""
        return rearrange(self.on_white(), "v c h w -> v h w c"), rearrange(self.masks, "v 1 h w -> v h w")

    def mirrored(self) -> MultiViewResult:
        """The 32 views of the mirrored object (reflected across the vertical plane of the
        azimuth-0 camera): each view flipped left-right, in the slot of azimuth -a."""
        order = mirrored_view_order()
        return MultiViewResult(self.images[order].flip(-1), self.masks[order].flip(-1))

    def rotated(self, shift: int) -> MultiViewResult:
        """The views in the frame turned by ``shift`` azimuth steps (``rotated_view_order``): views
        generated with a view at rig azimuth ``shift`` first, in the first input's frame."""
        order = rotated_view_order(shift)
        return MultiViewResult(self.images[order], self.masks[order])

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

    @staticmethod
    def ensemble(results: list[MultiViewResult]) -> MultiViewResult:
        """Several estimates of one object: the masks averaged, the estimates weighted equally,
        and the first estimate's colours. The estimates vote on the shape; the first paints it.
        ``generate`` combines two kinds of estimates this way: those of several models (a partner
        whose MVAE keeps less colour, the embedded default's, does not wash the colours out:
        docs/embedded_default.md, "Two checkpoints averaged"), and input averaging's, one per
        photo, each turned into the first photo's frame (a colour mean of views turned to a
        nearby, or wrong, azimuth blurs them: "More than one input view")."""
        if len(results) == 1:
            return results[0]
        return MultiViewResult(results[0].images, sum(r.masks for r in results) / len(results))


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
    model: MVDPPModel | Sequence[MVDPPModel],
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
    input_average: bool = False,
) -> MultiViewResult:
    """Generate the 32 rig views of the object shown in 1-10 condition views.

    Args:
        model: a loaded model, or several (a tuple or list: an ensemble, e.g. the embedded
            default and its partner, ``sampling_defaults.ensemble_partners``): each makes every
            pass below from its own encoding of the views, and an estimate takes the mean of
            their masks, the models weighted equally, and the first model's colours
            (``MultiViewResult.ensemble``). They must share an image size.
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
        average_seeds: average the views generated from this many noise draws, 1 to 16, taken
            in antithetic pairs: ``seed``'s starting noise, the same noise negated, then
            ``seed + 1``'s and its negation, ... (each also mirrored with ``mirror_average``).
            Averaged estimates are closer to the answer wherever a sampler returns a mean-like
            estimate (the embedded default's 2 ddim steps: README); a pair cancels the part of
            the output that is odd in the noise, which two independent seeds only average
            down. Each pass costs one generation; the callback counts the steps of all passes on
            one scale. Both are off by default: the samples of a many-step stochastic sampler
            may differ in detail, and their average blurs it.
        input_average: with 2 or more condition views, also generate with each other view
            first (it then defines azimuth 0, the others follow), find the rig azimuth at which
            that view sits in the first view's frame (``azimuth_shift``: the views are pose-free),
            turn its 32 views into that frame (``MultiViewResult.rotated``) and average the
            masks of all; the colours stay the first view's estimate's (``MultiViewResult.ensemble``:
            the photos vote on the shape, the first paints it). A model that reads only its
            first view (the embedded default) then gains from the others; each view costs the
            passes above again. Off by default; with one view it changes nothing.
    """
    # Every argument is checked before any work, so a mistake costs no encoding or UNet step.
    members = ensemble_members(model)
    sampler = parse_enum(SamplerName, sampler, "sampler")
    sample_fn = get_sampler(sampler)
    default_steps, spacing = SAMPLER_DEFAULTS[sampler]
    ts = [m.schedule.timesteps(default_steps if steps is None else steps, spacing) for m in members]
    seed, guidance = check_seed(seed), check_guidance(guidance)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is not callable; pass a function (step, total, x0) or None.")
    for name, switch in (("mirror_average", mirror_average), ("input_average", input_average)):
        if not isinstance(switch, bool):
            raise TypeError(f"{name}={switch!r}; pass True or False.")
    average_seeds = check_average_seeds(average_seeds)
    views = images if is_framed(images) else frame_condition(
        images, masks, size=members[0].config.image_size, mask_convention=mask_convention,
        background_tolerance=background_tolerance, fill=object_fill, embeddings=embeddings,
    )
    if mirror_average:
        views.mirrored()  # refuses outside embeddings before any step
    n = views.images.shape[0]
    firsts = range(n) if input_average else range(1)
    sides = (False, True) if mirror_average else (False,)
    conditions = {}  # each model, order and side of the views is encoded once, whatever the seeds
    for m, member in enumerate(members):
        for first in firsts:
            ordered = views.reordered([first] + [i for i in range(n) if i != first])
            for mirrored in sides:
                conditions[m, first, mirrored] = encode_views(member, ordered.mirrored() if mirrored else ordered)
    passes = [(m, first, k, mirrored) for m in range(len(members)) for first in firsts
              for k in range(average_seeds) for mirrored in sides]
    estimates = [[[] for _ in members] for _ in firsts]
    for j, (m, first, k, mirrored) in enumerate(passes):
        # Noise draws come in antithetic pairs: seed's noise, then the same noise negated, then seed + 1's.
        result = _sample(members[m], conditions[m, first, mirrored], (seed + k // 2) % (MAX_SEED + 1), ts[m],
                         sample_fn, guidance, _pass_callback(callback, j, len(passes)), negate=k % 2 == 1)
        estimates[first][m].append(result.mirrored() if mirrored else result)
    estimates = [MultiViewResult.ensemble([MultiViewResult.mean(e) for e in by_model]) for by_model in estimates]
    reference, first_view = estimates[0], views.masks[:1]
    return MultiViewResult.ensemble([reference] + [
        estimate.rotated(azimuth_shift(estimate, reference, views.masks[k : k + 1], first_view))
        for k, estimate in enumerate(estimates[1:], start=1)
    ])


def ensemble_members(model: MVDPPModel | Sequence[MVDPPModel]) -> list[MVDPPModel]:
    """The models ``generate`` averages: ``model`` alone, or the members of a tuple or list,
    checked to be loaded models of one image size."""
    members = list(model) if isinstance(model, (list, tuple)) else [model]
    if not members:
        raise ValueError("model=() holds no models; pass a loaded model, or a tuple of them to average.")
    for member in members:  # duck-typed: the node pack may import this package under another name,
        # giving MVDPPModel a second identity
        if not all(hasattr(member, a) for a in ("schedule", "encode_condition", "config")):
            raise TypeError(
                f"model is a {type(member).__name__}, not an MVDPPModel; load one with "
                "mvdpp_core.load_checkpoint('path/to/model.safetensors') (or pass a tuple of them)."
            )
    sizes = [member.config.image_size for member in members]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"the ensemble's models generate views of sizes {sizes}; average only models of one image size "
            "(the same recipe's checkpoints), or generate with each alone."
        )
    return members


ALIGN_SIZE = 64  # azimuth_shift compares silhouettes recentred to this size
ALIGN_ELEVATION_ROWS = (0, 1, 2)  # rig rows -30, 0 and 30 deg: around the condition views' -10..45


def azimuth_shift(estimate: MultiViewResult, reference: MultiViewResult, view_mask: Tensor,
                  reference_mask: Tensor) -> int:
    """The rig azimuth step (0-7, 45 deg each) at which a condition view sits in another's frame,
    judged from two estimates of the object's 32 views: ``estimate`` generated with the view
    (mask (1, 1, H, W)) first, ``reference`` with the other (``reference_mask``) first.

    A step s scores the mask IoU of ``estimate.rotated(s)`` with ``reference`` (pooled over
    the 32 views), plus how well each view's silhouette matches the other estimate's views
    where it would sit: the view against ``reference`` at azimuth s, the reference's view
    against ``estimate`` at azimuth -s (best of the rows at -30, 0 and 30 deg, each recentred,
    since a view's elevation and distance are unknown). The score is symmetric: swapping the
    two estimates scores -s as it scored s. Ties go to the smallest turn."""
    n = len(AZIMUTHS_DEG)
    view, reference_view = _silhouette(view_mask), _silhouette(reference_mask)
    scores = []
    for s in range(n):
        agreement = _mask_iou(estimate.rotated(s).masks, reference.masks)
        scores.append(agreement + (_column_match(view, reference, s) + _column_match(reference_view, estimate, -s % n)))
    best = max(scores)
    return min((s for s in range(n) if scores[s] == best), key=lambda s: (min(s, n - s), s))


def _mask_iou(a: Tensor, b: Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0


def _silhouette(mask: Tensor) -> Tensor | None:
    """A mask (1, 1, H, W) recentred to ALIGN_SIZE (what frame_condition does to a photo), or
    None when it holds no object."""
    if not (mask > 0.5).any():
        return None
    return recenter(mask.expand(-1, 3, -1, -1), mask, ALIGN_SIZE)[1]


def _column_match(view: Tensor | None, estimate: MultiViewResult, azimuth: int) -> float:
    """The best mask IoU of a recentred silhouette with ``estimate``'s views at one azimuth."""
    if view is None:
        return 0.0
    ious = [0.0]
    for row in ALIGN_ELEVATION_ROWS:
        other = _silhouette(estimate.masks[view_index(row, azimuth)][None])
        if other is not None:
            ious.append(_mask_iou(view, other))
    return max(ious)


def sampling_passes(num_views: int, mirror_average: bool = False, average_seeds: int = 1,
                    input_average: bool = False, models: int = 1) -> int:
    """How many sampling passes ``generate`` runs (each of ``steps`` steps) for these options
    and ``models`` models averaged."""
    return models * (num_views if input_average else 1) * average_seeds * (2 if mirror_average else 1)


def _pass_callback(callback: StepCallback | None, index: int, passes: int) -> StepCallback | None:
    """The callback of pass ``index`` of ``passes`` sampling passes of n steps each, counting
    steps 1 .. passes * n in all."""
    if callback is None:
        return None
    return lambda i, n, x0: callback(index * n + i, passes * n, x0)


def _sample(model: MVDPPModel, cond: Condition, seed: int, ts: Tensor, sample_fn: Sampler, guidance: float,
            callback: StepCallback | None, negate: bool = False) -> MultiViewResult:
    """One sampling pass from an encoded condition: denoise from the seed's noise (``negate``: that
    noise negated, the antithetic draw; a stochastic sampler's later noise is the seed's as drawn), decode."""
    vae_dtype = model.vae_dtype
    denoiser = guided_denoiser(model, cond, guidance)
    generator = torch.Generator().manual_seed(seed)
    latent = model.config.latent_size
    shape = (1, NUM_TARGET_VIEWS + cond.num_views, model.config.vae.latent_channels, latent, latent)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)
    if negate:
        x = -x
    x0 = sample_fn(denoiser, x, model.schedule, ts, generator=generator, callback=callback)
    if not torch.isfinite(x0).all():  # decoding NaN gives 32 blank views: say why instead
        raise ValueError(nonfinite_cause(model, guidance))
    targets = rearrange(x0[:, :NUM_TARGET_VIEWS], "1 v c h w -> v c h w")
    # Decode a few views at a time: 32 full-size decodes at once need tens of GB.
    decoded = [model.vae.decode(chunk.to(vae_dtype)) for chunk in targets.split(DECODE_CHUNK)]
    rgb = torch.cat([d[0] for d in decoded]).float().cpu()
    mask = torch.cat([d[1] for d in decoded]).float().cpu()
    return MultiViewResult(straight_colours(rgb, mask), mask)  # on_white() gives the decoded views back


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
