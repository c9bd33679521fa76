"""ComfyUI tensor layouts <-> mvdpp_core layouts, with errors that name the socket.

ComfyUI: IMAGE (B, H, W, C) float in [0, 1], C = 3 (or 4 with alpha); MASK (B, H, W).
mvdpp_core: images (n, 3, H, W), masks (n, 1, H, W).
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor


def check_image(image: object, socket: str = "images") -> Tensor:
    """Raise unless ``image`` is a ComfyUI IMAGE (B, H, W, 3 or 4)."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{socket}: expected an IMAGE tensor, got {type(image).__name__}; connect an IMAGE output.")
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(
            f"{socket}: IMAGE has shape {tuple(image.shape)}; expected [batch, height, width, 3 or 4 channels]."
        )
    return image


def check_mask(mask: object, socket: str = "mask") -> Tensor:
    """Raise unless ``mask`` is a ComfyUI MASK (B, H, W); a single (H, W) mask gains a batch axis."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{socket}: expected a MASK tensor, got {type(mask).__name__}; connect a MASK output.")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"{socket}: MASK has shape {tuple(mask.shape)}; expected [batch, height, width].")
    return mask


def image_to_core(image: Tensor) -> tuple[Tensor, Tensor | None]:
    """IMAGE (B, H, W, C) -> RGB (B, 3, H, W) float32 and alpha (B, 1, H, W) when C = 4."""
    chw = rearrange(image.float(), "b h w c -> b c h w")
    alpha = chw[:, 3:4] if chw.shape[1] == 4 else None
    return chw[:, :3].contiguous(), alpha


def mask_to_core(mask: Tensor) -> Tensor:
    """MASK (B, H, W) -> (B, 1, H, W) float32."""
    return rearrange(mask.float(), "b h w -> b 1 h w")


def image_from_core(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> IMAGE (B, H, W, 3) float32 on the CPU, clamped to [0, 1]."""
    return rearrange(images, "b c h w -> b h w c").float().clamp(0, 1).cpu().contiguous()


def mask_from_core(masks: Tensor) -> Tensor:
    """(B, 1, H, W) -> MASK (B, H, W) float32 on the CPU, clamped to [0, 1]."""
    return rearrange(masks, "b 1 h w -> b h w").float().clamp(0, 1).cpu().contiguous()

