"""MaskAwareEncode: 1-10 condition photos + foreground masks -> MVDPP_COND for the sampler.

A thin adapter: ComfyUI's IMAGE / MASK / CLIP vision in, one ``mvdpp_core.condition.frame_condition``
call (the same photo handling a Python user of ``generate`` gets), MVDPP_COND out.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from ..mvdpp_core.common import MaskNeeded
from ..mvdpp_core.condition import ConditionViews, MaskConvention
from ._checks import check_choice, first_error
from ._comfy import MVDPPCondSocket, MVDPPModelSocket, core_background_removal, io, schema
from ._convert import check_image, check_mask, image_from_core
from .loader import LoadedModel

FOREGROUND_ONE = MaskConvention.FOREGROUND.value
ALPHA_INVERTED = MaskConvention.ALPHA_INVERTED.value
# Where the running ComfyUI has core background removal, the errors and the mask tooltip name it.
CORE_BACKGROUND_REMOVAL = (
    "This ComfyUI has one: Remove Background (with Load Background Removal Model and a model such as "
    f"BiRefNet in models/background_removal); its MASK is 1 on the object, mask_convention '{FOREGROUND_ONE}'."
)
MASK_CONVENTIONS = [c.value for c in MaskConvention]
__all__ = ["ALPHA_INVERTED", "FOREGROUND_ONE", "MASK_CONVENTIONS", "ConditionViews", "MaskAwareEncode"]

class MaskAwareEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MVDPP_MaskAwareEncode",
            search_aliases=["mvdiffusion", "mvdpp", "multiview condition",
                            "image to 3d", "photos to 3d", "encode views"],
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
                    "images' alpha is used, else a plain backdrop is cut out by colour."
                    + (" Core Remove Background gives such a mask." if core_background_removal() else ""),
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
        from ..mvdpp_core.condition import frame_condition

        clip = model.clip_vision
        try:
            cond = frame_condition(
                rearrange(check_image(images).float(), "n h w c -> n c h w"),
                None if mask is None else check_mask(mask).float(),
                size=model.model.config.image_size,
                mask_convention=mask_convention,
                background_tolerance=background_tolerance,
                fill=object_fill,
                image_encoder=None if clip is None else lambda views: clip.encode_image(image_from_core(views)),
                embedding_dim=model.model.config.unet.cross_attention_dim,
            )
        except MaskNeeded as e:  # name the node that makes a mask, where this ComfyUI has one
            if core_background_removal():
                raise MaskNeeded(f"{e} {CORE_BACKGROUND_REMOVAL}") from None
            raise
        return io.NodeOutput(cond, image_from_core(cond.images))
