"""MaskAwareEncode: 1-10 condition photos + foreground masks -> MVDPP_COND for the sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, first_error
from ._comfy import MVDPPCondSocket, MVDPPModelSocket, io
from ._convert import check_image, check_mask, image_from_core, image_to_core, mask_to_core
from .loader import LoadedModel

FOREGROUND_ONE = "foreground=1 (background removal nodes)"
ALPHA_INVERTED = "alpha-inverted (LoadImage MASK)"
MASK_CONVENTIONS = [FOREGROUND_ONE, ALPHA_INVERTED]
# Core LoadImage's MASK for a picture without alpha, whatever the picture's size.
PLACEHOLDER_SIZE = (64, 64)


@dataclass
class ConditionViews:
    """What flows through an MVDPP_COND socket: condition views already framed like the
    training renders (recentred once, here), at the model's image size.

    images (n, 3, S, S) on white, masks (n, 1, S, S), embeddings (n, d) or None (then the
    checkpoint's bundled image encoder embeds the images).
    """

    images: Tensor
    masks: Tensor
    embeddings: Tensor | None = None


def check_view_count(n: int) -> None:
    from ..mvdpp_core.cameras import MAX_CONDITION_VIEWS

    if n < 1:
        raise ValueError("0 condition images were given (an empty IMAGE batch); connect 1 to 10 photos.")
    if n > MAX_CONDITION_VIEWS:
        raise ValueError(
            f"{n} condition images were given; MVDiffusion++ takes 1 to {MAX_CONDITION_VIEWS}. "
            f"Remove {n - MAX_CONDITION_VIEWS} image(s) from the batch (fewer ImageBatch inputs)."
        )


def is_loadimage_placeholder(mask: Tensor, height: int, width: int) -> bool:
    """True for core LoadImage's MASK of a picture without alpha (a JPG): 64x64 zeros
    whatever the picture's size. It is a placeholder, not a mask."""
    return tuple(mask.shape[-2:]) == PLACEHOLDER_SIZE != (height, width) and not bool(mask.any())


def masks_from_input(mask: Tensor, images: Tensor, convention: str) -> Tensor | None:
    """MASK (m, H, W) -> foreground masks (n, 1, H, W) after checking count, size and polarity.

    None for LoadImage's placeholder (no mask at all). A view whose mask is object
    everywhere (an opaque picture's MASK) comes back all ones: it outlines nothing, and
    ``foreground_masks`` cuts that view out as if no mask were connected.
    """
    from ..mvdpp_core.segment import inverted_views

    mask = check_mask(mask)
    n, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    if is_loadimage_placeholder(mask, height, width):
        return None
    if mask.shape[0] != n:
        raise ValueError(
            f"{mask.shape[0]} mask(s) for {n} image(s); give one mask per image (batch the masks in the same "
            "order as the images), or leave 'mask' unconnected to use the images' alpha."
        )
    if tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(
            f"mask size {mask.shape[-1]}x{mask.shape[-2]} differs from image size {width}x{height}; connect the "
            "mask that belongs to these images, or resize it to the image size first."
        )
    if convention not in MASK_CONVENTIONS:
        raise ValueError(f"mask_convention {convention!r} is not one of {MASK_CONVENTIONS}.")
    masks = mask_to_core(mask)
    if convention == ALPHA_INVERTED:
        masks = 1.0 - masks
    empty = (is_blank(masks) & (masks.flatten(1).amax(dim=1) < 0.5)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"the mask of view(s) {empty} has the same value everywhere and marks no pixel as object for "
            f"mask_convention '{convention}', so it outlines no object. Check mask_convention, add a "
            "background-removal node and connect its MASK, or disconnect 'mask' to cut out a plain backdrop "
            "automatically."
        )
    inverted = inverted_views(masks)
    if inverted:
        other = ALPHA_INVERTED if convention == FOREGROUND_ONE else FOREGROUND_ONE
        raise ValueError(
            f"the mask of view(s) {inverted} marks the image border as object, so it looks inverted for "
            f"mask_convention '{convention}'. Set mask_convention to '{other}' (LoadImage's MASK is 1 where "
            "the image is transparent; background-removal nodes give 1 on the object)."
        )
    return masks


def is_blank(masks: Tensor) -> Tensor:
    """Per view (n,): True when a mask (n, 1, H, W) is one value everywhere (no outline)."""
    flat = masks.flatten(1)
    return (flat.amax(dim=1) - flat.amin(dim=1)) < 0.5


def foreground_masks(images: Tensor, mask: Tensor | None, convention: str, tolerance: float) -> tuple[Tensor, Tensor]:
    """RGB (n, 3, H, W) and masks (n, 1, H, W): from MASK, else alpha, else a plain backdrop.

    Decided per view: a mask or alpha channel that is object everywhere (a picture without
    transparency: LoadImage's MASK of an opaque PNG, a JPG's placeholder, an opaque alpha)
    carries no outline, so the next source is used for that view.
    """
    from ..mvdpp_core.segment import segment_uniform_background

    rgb, alpha = image_to_core(images)
    masks = masks_from_input(mask, rgb, convention) if mask is not None else None
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
    return rgb, masks


def clip_embeddings(clip_vision: object, images: Tensor, masks: Tensor, dim: int) -> Tensor:
    """Projected CLIP image embeddings (n, dim) from a ComfyUI CLIP vision model, of the objects on white."""
    composite = images * masks + (1 - masks)
    output = clip_vision.encode_image(image_from_core(composite))  # type: ignore[attr-defined]
    embeds = getattr(output, "image_embeds", None)
    if embeds is None:
        raise ValueError(
            "the connected CLIP vision model gives no projected image_embeds; load a CLIP vision model with a "
            "projection head (e.g. OpenCLIP ViT-H/14), or disconnect it to use the checkpoint's image encoder."
        )
    if embeds.ndim != 2 or embeds.shape[-1] != dim:
        raise ValueError(
            f"the connected CLIP vision model gives embeddings of shape {tuple(embeds.shape)}; this checkpoint "
            f"needs {dim}-d projected embeddings. Load the CLIP vision model the checkpoint was trained with, or "
            "disconnect clip_vision to use the checkpoint's own image encoder."
        )
    return embeds.float().cpu()


class MaskAwareEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MVDPP_MaskAwareEncode",
            display_name="MVDiffusion++ Condition Views",
            category="MVDiffusion++/conditioning",
            description="Prepares 1-10 photos of one object (no poses needed) as the condition of the "
            "multi-view sampler: foreground masks, recentring and scaling as in training.",
            inputs=[
                MVDPPModelSocket.Input("model", tooltip="The model from Load MVDiffusion++ Model."),
                io.Image.Input(
                    "images",
                    tooltip="1 to 10 photos of the same object as one batch (use ImageBatch to combine). The "
                    "first image defines azimuth 0 of the output views. RGBA images use their alpha as the mask "
                    "(unless fully opaque).",
                ),
                io.Combo.Input(
                    "mask_convention", options=MASK_CONVENTIONS, default=FOREGROUND_ONE,
                    tooltip="How to read the optional mask: background-removal nodes give 1 on the object; "
                    "LoadImage's MASK is 1 where the image is transparent (choose alpha-inverted for it).",
                ),
                io.Float.Input(
                    "background_tolerance", default=0.1, min=0.01, max=0.9, step=0.01,
                    tooltip="Only when there is neither a mask nor alpha: colour distance from the plain "
                    "backdrop (the image border's colour) above which a pixel counts as object.",
                ),
                io.Float.Input(
                    "object_fill", default=0.55, min=0.1, max=1.0, step=0.01,
                    tooltip="Fraction of the image side the object's longest side spans after recentring "
                    "(0.55 matches the training renders).",
                ),
                io.Mask.Input(
                    "mask", optional=True,
                    tooltip="Optional foreground masks, one per image, same size as the images. Without it the "
                    "images' alpha is used, else a plain backdrop is cut out by colour.",
                ),
            ],
            outputs=[
                MVDPPCondSocket.Output(display_name="cond", tooltip="The condition views for the multi-view sampler."),
                io.Image.Output(
                    display_name="framed", tooltip="The condition views as the model sees them: recentred, on white."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, mask_convention: str | None = None) -> bool | str:
        return first_error(lambda: check_choice("mask_convention", mask_convention, MASK_CONVENTIONS))

    @classmethod
    def execute(
        cls,
        model: LoadedModel,
        images: Tensor,
        mask_convention: str,
        background_tolerance: float,
        object_fill: float,
        mask: Tensor | None = None,
    ) -> io.NodeOutput:
        from ..mvdpp_core.inputs import check_condition_views, recenter

        check_view_count(check_image(images).shape[0])
        rgb, masks = foreground_masks(images, mask, mask_convention, background_tolerance)
        rgb, masks = check_condition_views(rgb, masks)
        framed, framed_masks = recenter(rgb, masks, model.model.config.image_size, fill=object_fill)
        embeddings = None
        if model.clip_vision is not None:
            dim = model.model.config.unet.cross_attention_dim
            embeddings = clip_embeddings(model.clip_vision, framed, framed_masks, dim)
        cond = ConditionViews(framed, framed_masks, embeddings)
        return io.NodeOutput(cond, image_from_core(framed))
