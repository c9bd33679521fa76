"""Small pieces every part of the core shares: enum arguments with a teaching error, the error
of a photo that needs a foreground mask, and compositing on white (the background of the
training renders and of every view the model sees or makes)."""

from __future__ import annotations

import enum
from typing import TypeVar

import torch
from torch import Tensor

E = TypeVar("E", bound=enum.Enum)


class MaskNeeded(ValueError):
    """A condition photo needs a foreground mask it does not have (a cluttered backdrop, a mask
    that is empty or inverted): the fix is a background-removal node, which a caller that knows
    one (the node pack, where ComfyUI has one in core) can name."""


def parse_enum(kind: type[E], value: object, name: str) -> E:
    """Accept an enum member or its string value; raise a teaching ValueError otherwise."""
    if isinstance(value, kind):
        return value
    allowed = [m.value for m in kind]
    if isinstance(value, str) and value.lower().lstrip(".") in allowed:
        return kind(value.lower().lstrip("."))
    if isinstance(value, str) and value in allowed:
        return kind(value)
    raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}. Pass one of these strings.")


def composite_on_white(images: Tensor, masks: Tensor) -> Tensor:
    """Colours over white through masks, in either layout as long as they broadcast:
    (n, 3, H, W) with (n, 1, H, W), or (n, H, W, 3) with (n, H, W, 1)."""
    return images * masks + (1 - masks)


# Below this coverage a decoded pixel keeps its on-white colour: dividing by the mask would
# magnify the decoder's error (x 20 at the floor) for pixels that are nearly all backdrop.
STRAIGHT_MASK_FLOOR = 0.05


def straight_colours(on_white: Tensor, masks: Tensor) -> Tensor:
    """The object's own colours from colours composited on white through ``masks``: the
    inverse of :func:`composite_on_white`, ``(w - (1 - a)) / a``, clamped to [0, 1], where the
    mask ``a`` reaches ``STRAIGHT_MASK_FLOOR``; ``w`` itself below it. The MVAE decodes views on
    white (its training views are), and compositing those again through a soft mask would
    lighten every antialiased outline pixel a second time (a^2 c + 1 - a^2)."""
    straight = ((on_white - (1 - masks)) / masks.clamp(min=STRAIGHT_MASK_FLOOR)).clamp(0, 1)
    return torch.where(masks >= STRAIGHT_MASK_FLOOR, straight, on_white)
