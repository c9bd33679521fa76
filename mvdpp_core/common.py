"""Small pieces every part of the core shares: enum arguments with a teaching error, and
compositing on white (the background of the training renders and of every view the model
sees or makes)."""

from __future__ import annotations

import enum
from typing import TypeVar

from torch import Tensor

E = TypeVar("E", bound=enum.Enum)


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
