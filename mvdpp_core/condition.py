"""The condition stage: user photos -> framed condition views -> the ``Condition`` the UNet sees.

This is the one place that prepares the condition, for every caller (``generate``, the
ComfyUI node, training):

1. ``frame_condition``: 1-10 photos (n, 3 or 4, H, W) in [0, 1], with optional masks
   (n, H, W) or (n, 1, H, W), become ``ConditionViews`` framed like the training renders:
   the foreground mask of each view comes from the given mask, else the image's alpha,
   else a cut-out of a plain backdrop (decided view by view: a mask or alpha that is one
   value everywhere outlines nothing); each view is recentred so the object spans
   ``fill`` of the side, on white, at the model's image size; optional external image
   embeddings (e.g. ComfyUI's CLIP vision) are computed from the framed views.
2. ``encode_condition``: framed views -> ``Condition`` (MVAE latents + one CLIP image
   embedding per view, from the bundled encoder, a trained one, or given embeddings).
3. ``null_condition`` (classifier-free guidance) and ``drop_condition`` (training dropout).

Mask convention: 1 = object (``MaskConvention.FOREGROUND``, what background-removal nodes
give); ``MaskConvention.ALPHA_INVERTED`` reads masks that are 1 where the picture is
transparent (ComfyUI LoadImage's MASK).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from einops import repeat
from torch import Tensor

from .common import MaskNeeded, composite_on_white, parse_enum
from .inputs import DEFAULT_FILL, check_vae_size, recenter, resize

if TYPE_CHECKING:
    from .image_encoder import ImageEncoder
    from .model import MVDPPModel

# Core LoadImage's MASK for a picture without alpha, whatever the picture's size.
PLACEHOLDER_SIZE = (64, 64)
# An external image encoder: framed views (n, 3, S, S) on white -> embeddings (n, d), or an
# output object with ``image_embeds`` (transformers' and ComfyUI's CLIP vision outputs).
ExternalEncoder = Callable[[Tensor], object]


class MaskConvention(str, enum.Enum):
    """How to read a given mask (the values are the node's option texts)."""

    FOREGROUND = "foreground=1 (background removal nodes)"
    ALPHA_INVERTED = "alpha-inverted (LoadImage MASK)"


@dataclass
class Condition:
    """Everything the UNet sees of the condition views of a batch of objects.

    latents: (b, n, 4, h, w) MVAE latents of the condition views.
    embeddings: (b, n, d) CLIP image embeddings, one cross-attention token per view.
    """

    latents: Tensor
    embeddings: Tensor

    @property
    def num_views(self) -> int:
        return self.latents.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        return Condition(self.latents.to(device, dtype), self.embeddings.to(device, dtype))


@dataclass
class ConditionViews:
    """Condition views framed like the training renders (what an MVDPP_COND socket holds).

    images (n, 3, S, S) on white, masks (n, 1, S, S), embeddings (n, d) or None (then the
    model's image encoder embeds the images).
    """

    images: Tensor
    masks: Tensor
    embeddings: Tensor | None = None

    @classmethod
    def framed(cls, images: Tensor, masks: Tensor, embeddings: Tensor | None = None) -> ConditionViews:
        """Views that are framed already (training renders, a previous ``frame_condition``):
        checked, not recentred. images (n, 3, H, W), masks (n, H, W) or (n, 1, H, W), 1 = object."""
        if masks is None:
            raise TypeError("framed condition views need their masks (n, H, W); pass them, or frame photos "
                            "without masks with frame_condition (alpha, else a plain backdrop).")
        rgb, alpha, masks = check_condition_images(images, masks)
        if alpha is not None:
            raise ValueError(
                f"framed condition views have shape {tuple(images.shape)}; expected (n, 3, H, W) RGB with the "
                "masks given apart (or call frame_condition, which reads alpha)."
            )
        if masks.shape[0] != rgb.shape[0] or masks.shape[-2:] != rgb.shape[-2:]:
            raise ValueError(
                f"masks {tuple(masks.shape)} do not match images {tuple(rgb.shape)}: give one mask per image with "
                "the same height and width."
            )
        check_not_empty(masks)
        return cls(rgb, masks, check_embeddings(embeddings))

    def reordered(self, order: list[int]) -> ConditionViews:
        """The views (and their embeddings) in ``order``; the first defines azimuth 0."""
        return ConditionViews(self.images[order], self.masks[order],
                              None if self.embeddings is None else self.embeddings[order])

    def mirrored(self) -> ConditionViews:
        """The views flipped left-right: the same photos of the mirrored object. Embeddings given
        from outside belong to the unflipped images, so they are refused (the model's own
        encoder embeds the flipped ones)."""
        if self.embeddings is not None:
            raise ValueError(
                "mirror averaging flips the condition views, but their image embeddings were given from outside "
                f"(shape {tuple(self.embeddings.shape)}) and belong to the unflipped images; turn mirror averaging "
                "off, or leave the embeddings to the model's image encoder."
            )
        return ConditionViews(self.images.flip(-1), self.masks.flip(-1))


def check_view_count(n: int) -> None:
    """1 to 10 condition views; the message names the count and the fix."""
    from .cameras import MAX_CONDITION_VIEWS  # kornia: not at import (the node pack imports this module)

    if n < 1:
        raise ValueError(
            f"{n} condition views given; the model takes 1 to {MAX_CONDITION_VIEWS} ({n} condition images were "
            f"given, an empty batch): connect 1 to {MAX_CONDITION_VIEWS} photos, at least one image of the object."
        )
    if n > MAX_CONDITION_VIEWS:
        raise ValueError(
            f"{n} condition views given; the model takes 1 to {MAX_CONDITION_VIEWS}. Of the {n} condition images, "
            f"keep 1 to {MAX_CONDITION_VIEWS}. Remove {n - MAX_CONDITION_VIEWS} image(s) from the batch (pass fewer "
            "images, or fewer ImageBatch inputs)."
        )


def check_condition_images(images: object, masks: object | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Validate photos (n, 3 or 4, H, W) and optional masks (m, H, W) / (m, 1, H, W) in [0, 1].

    Returns RGB (n, 3, H, W) float, alpha (n, 1, H, W) or None, masks (m, 1, H, W) float or None.
    Mask count and size are checked later (a LoadImage placeholder has neither).
    """
    if not isinstance(images, Tensor) or not (masks is None or isinstance(masks, Tensor)):
        raise TypeError(
            f"images and masks must be torch tensors, got {type(images).__name__} and {type(masks).__name__}."
        )
    if images.ndim != 4 or images.shape[1] not in (3, 4):
        raise ValueError(
            f"condition images have shape {tuple(images.shape)}; expected (n, 3, H, W) RGB or (n, 4, H, W) RGBA "
            "(ComfyUI IMAGE [n, H, W, C] needs a permute)."
        )
    check_view_count(images.shape[0])
    if masks is not None:
        masks = masks[:, None] if masks.ndim == 3 else masks
        if masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"masks have shape {tuple(masks.shape)}; expected (n, H, W) or (n, 1, H, W).")
    for name, t in (("images", images), ("masks", masks)):
        if t is None:
            continue
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contain NaN or infinite values; check the node or file that produced them.")
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(
                f"{name} range [{t.min().item():.3g}, {t.max().item():.3g}] is outside [0, 1]; scale them to [0, 1]."
            )
    images = images.float()
    alpha = images[:, 3:] if images.shape[1] == 4 else None
    return images[:, :3], alpha, None if masks is None else masks.float()


def is_blank(masks: Tensor) -> Tensor:
    """Per view (n,): True when a mask (n, 1, H, W) is one value everywhere (no outline)."""
    flat = masks.flatten(1)
    return (flat.amax(dim=1) - flat.amin(dim=1)) < 0.5


def is_loadimage_placeholder(mask: Tensor, height: int, width: int) -> bool:
    """True for core LoadImage's MASK of a picture without alpha (a JPG): 64x64 zeros
    whatever the picture's size. It is a placeholder, not a mask."""
    return tuple(mask.shape[-2:]) == PLACEHOLDER_SIZE != (height, width) and not bool(mask.any())


def masks_from_input(masks: Tensor, n: int, height: int, width: int, convention: MaskConvention) -> Tensor | None:
    """Given masks (m, 1, H, W) -> foreground masks (n, 1, H, W) after checking count, size and polarity.

    None for LoadImage's placeholder (no mask at all). A view whose mask is object
    everywhere (an opaque picture's MASK) comes back all ones: it outlines nothing, and
    ``foreground_masks`` cuts that view out as if no mask were given.
    """
    from .segment import inverted_views

    if is_loadimage_placeholder(masks, height, width):
        return None
    if masks.shape[0] != n:
        raise ValueError(
            f"{masks.shape[0]} mask(s) for {n} image(s); give one mask per image (the masks do not match images: "
            "batch the masks in the same order as the images), or leave 'mask' unconnected (masks=None) to use the "
            "images' alpha."
        )
    if tuple(masks.shape[-2:]) != (height, width):
        raise ValueError(
            f"mask size {masks.shape[-1]}x{masks.shape[-2]} differs from image size {width}x{height}: the masks do "
            "not match images of this size. Give masks of the same height and width as the images (connect the "
            "mask that belongs to these images, or resize it to the image size first)."
        )
    if convention is MaskConvention.ALPHA_INVERTED:
        masks = 1.0 - masks
    empty = (is_blank(masks) & (masks.flatten(1).amax(dim=1) < 0.5)).nonzero().flatten().tolist()
    if empty:
        raise MaskNeeded(
            f"the mask of condition view(s) {empty} is empty: it has the same value everywhere and marks no "
            f"pixel as object (1 = object) for mask_convention '{convention.value}', so it outlines no object. Check "
            "mask_convention, add a background-removal node and connect its MASK, or disconnect 'mask' "
            "(masks=None) to cut out a plain backdrop automatically."
        )
    inverted = inverted_views(masks)
    if inverted:
        other = MaskConvention.ALPHA_INVERTED if convention is MaskConvention.FOREGROUND else MaskConvention.FOREGROUND
        raise MaskNeeded(
            f"the mask of view(s) {inverted} marks the image border as object, so it looks inverted for "
            f"mask_convention '{convention.value}'. Set mask_convention to '{other.value}' (LoadImage's MASK is 1 "
            "where the image is transparent; background-removal nodes give 1 on the object)."
        )
    return masks


def foreground_masks(
    rgb: Tensor, alpha: Tensor | None, masks: Tensor | None, convention: MaskConvention, tolerance: float
) -> Tensor:
    """Masks (n, 1, H, W) of RGB views (n, 3, H, W): from the given masks, else alpha, else a plain backdrop.

    Decided per view: a mask or alpha channel that is object everywhere (a picture without
    transparency: LoadImage's MASK of an opaque PNG, a JPG's placeholder, an opaque alpha)
    carries no outline, so the next source is used for that view.
    """
    from .segment import segment_uniform_background

    n, height, width = rgb.shape[0], rgb.shape[-2], rgb.shape[-1]
    masks = masks_from_input(masks, n, height, width, convention) if masks is not None else None
    if masks is None:
        masks = torch.ones_like(rgb[:, :1])
    if alpha is not None:
        use_alpha = is_blank(masks) & ~is_blank(alpha)
        masks = torch.where(use_alpha[:, None, None, None], alpha, masks)
    unmasked = is_blank(masks)
    if unmasked.any():
        masks = masks.clone()
        numbers = unmasked.nonzero().flatten().tolist()
        masks[unmasked] = segment_uniform_background(rgb[unmasked], tolerance=tolerance, view_numbers=numbers)
    return masks


def check_not_empty(masks: Tensor) -> None:
    """Every mask (n, 1, H, W) marks some pixel as object (recentring needs an outline)."""
    empty = (masks.flatten(1).amax(dim=1) < 0.5).nonzero().flatten().tolist()
    if empty:
        raise MaskNeeded(
            f"the mask of condition view(s) {empty} is empty (no foreground); add a background-removal "
            "node, or check the mask convention (1 = object)."
        )


def check_embeddings(embeddings: object) -> Tensor | None:
    if embeddings is not None and not isinstance(embeddings, Tensor):
        raise TypeError(
            f"embeddings is a {type(embeddings).__name__}; pass a torch tensor (n, d) of CLIP image "
            "embeddings, or None to use the bundled image encoder."
        )
    return embeddings


def frame_condition(
    images: Tensor,
    masks: Tensor | None = None,
    *,
    size: int,
    mask_convention: MaskConvention | str = MaskConvention.FOREGROUND,
    background_tolerance: float = 0.1,
    fill: float = DEFAULT_FILL,
    embeddings: Tensor | None = None,
    image_encoder: ExternalEncoder | None = None,
    embedding_dim: int | None = None,
) -> ConditionViews:
    """1-10 photos of one object -> condition views framed like the training renders.

    Args:
        images: (n, 3, H, W) RGB or (n, 4, H, W) RGBA in [0, 1]; the first defines azimuth 0.
        masks: optional (n, H, W) or (n, 1, H, W) masks read by ``mask_convention``; without
            them (or for a view whose mask is one value) the alpha, else a plain backdrop.
        size: the model's image size (``model.config.image_size``).
        background_tolerance: colour distance from a plain backdrop counted as object.
        fill: fraction of the side the object's longest side spans after recentring.
        embeddings: (n, d) CLIP image embeddings to use instead of the model's encoder.
        image_encoder: an external encoder (e.g. ComfyUI's CLIP vision) run on the framed
            views on white; its embeddings must be (n, ``embedding_dim``).
    """
    convention = parse_enum(MaskConvention, mask_convention, "mask_convention")
    embeddings = check_embeddings(embeddings)
    rgb, alpha, given = check_condition_images(images, masks)
    masks = foreground_masks(rgb, alpha, given, convention, background_tolerance)
    check_not_empty(masks)
    framed, framed_masks = recenter(rgb, masks, size, fill=fill)
    if image_encoder is not None:
        embeddings = external_embeddings(image_encoder, framed, framed_masks, embedding_dim)
    return ConditionViews(framed, framed_masks, embeddings)


def external_embeddings(encoder: ExternalEncoder, images: Tensor, masks: Tensor, dim: int | None) -> Tensor:
    """Projected image embeddings (n, dim) of the objects (n, 3, S, S) on white from an external encoder."""
    output = encoder(composite_on_white(images, masks))
    embeds = output if isinstance(output, Tensor) else getattr(output, "image_embeds", None)
    if embeds is None:
        raise ValueError(
            "the connected CLIP vision model gives no projected image_embeds; load a CLIP vision model with a "
            "projection head (e.g. OpenCLIP ViT-H/14), or disconnect it to use the checkpoint's image encoder."
        )
    if embeds.ndim != 2 or (dim is not None and embeds.shape[-1] != dim):
        raise ValueError(
            f"the connected CLIP vision model gives embeddings of shape {tuple(embeds.shape)}; this checkpoint "
            f"needs {dim}-d projected embeddings. Load the CLIP vision model the checkpoint was trained with, or "
            "disconnect clip_vision to use the checkpoint's own image encoder."
        )
    return embeds.float().cpu()


def embed_on_white(image_encoder: ImageEncoder, images: Tensor, masks: Tensor) -> Tensor:
    """Image embeddings (n, d) of views (n, 3, H, W) composited on white by their masks (n, 1, H, W)."""
    return image_encoder(composite_on_white(images, masks))


def encode_condition(
    model: MVDPPModel,
    images: Tensor,
    masks: Tensor,
    embeddings: Tensor | None = None,
    *,
    latents: Tensor | None = None,
) -> Condition:
    """Condition of one object from its framed views (n, 3, H, W) and masks (n, 1, H, W) in [0, 1].

    ``embeddings`` (n, d) replaces the bundled image encoder (e.g. ComfyUI's CLIP vision).
    ``latents`` (n, 4, h, w): the views' MVAE latents (posterior mode) when the caller has
    them already (training encodes all views of an object in one MVAE pass).
    """
    check_vae_size(images.shape[-2], images.shape[-1], model.config.vae.downsample)
    if latents is None:
        latents = model.vae.encode(images, masks)  # n 4 h w
    if embeddings is None:
        if model.image_encoder is None:
            raise ValueError(
                "this model has no image encoder; pass CLIP image embeddings (e.g. connect a "
                "CLIP_VISION model to LoadMVDPP), or load a checkpoint that bundles one."
            )
        embeddings = embed_on_white(model.image_encoder, images, masks)  # n d
    expected = model.config.unet.cross_attention_dim
    if embeddings.shape != (images.shape[0], expected):
        raise ValueError(
            f"image embeddings have shape {tuple(embeddings.shape)}; this model needs "
            f"({images.shape[0]}, {expected}): one {expected}-d projected CLIP embedding per "
            "condition view (use a CLIP vision model whose projection matches)."
        )
    return Condition(latents[None], embeddings[None].to(latents.dtype))


def encode_views(model: MVDPPModel, views: ConditionViews) -> Condition:
    """``Condition`` of framed views, resized to the model's image size, on its device."""
    size, dtype = model.config.image_size, model.vae_dtype
    images, masks = resize(views.images.float(), size), resize(views.masks.float(), size)
    embeddings = None if views.embeddings is None else views.embeddings.to(model.device)
    return encode_condition(model, images.to(model.device, dtype), masks.to(model.device, dtype), embeddings)


def null_condition(cond: Condition, empty: Tensor) -> Condition:
    """The condition with images and embeddings dropped (classifier-free guidance): every
    view's latent is ``empty`` (b, 4, h, w), the embeddings are zero."""
    latents = repeat(empty, "b c h w -> b n c h w", n=cond.num_views).to(cond.latents.dtype)
    return Condition(latents, torch.zeros_like(cond.embeddings))


def drop_condition(cond: Condition, empty: Tensor, drop: Tensor, drop_tokens: Tensor) -> Condition:
    """Training dropout, the one place it happens: objects with ``drop`` (b,) get the null
    condition (as guidance drops it); objects with ``drop_tokens`` (b,) lose their image
    embedding tokens (``drop`` implies ``drop_tokens``)."""
    null = null_condition(cond, empty)
    latents = torch.where(drop[:, None, None, None, None], null.latents, cond.latents)
    return Condition(latents, drop_embeddings(cond.embeddings, drop | drop_tokens))


def drop_embeddings(embeddings: Tensor, drop_tokens: Tensor) -> Tensor:
    """Embeddings (b, n, d) with the tokens of objects ``drop_tokens`` (b,) zeroed (the null
    condition's embeddings); a trained image encoder's embeddings are dropped with it."""
    return torch.where(drop_tokens[:, None, None], 0.0, embeddings)
