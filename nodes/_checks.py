"""Queue-time checks of widget values, for the nodes' ``validate_inputs``.

ComfyUI 0.3.75 checks neither V3 option lists (an API prompt may send any string as a
combo value) nor NaN against a FLOAT's min / max, and it skips its own min / max check for
every input that a node's ``validate_inputs`` names. So each node names the inputs it
checks here, and these checks cover options and ranges in full. A value linked from
another node arrives as None: it is checked when the node runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def check_choice(name: str, value: object, options: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``options`` (None, a linked value, passes)."""
    if value is not None and value not in options:
        raise ValueError(
            f"{name} {value!r} is not one of {list(options)}; choose one of these (an API prompt must use "
            "the exact option text)."
        )


def check_number(name: str, value: object, low: float, high: float) -> None:
    """Raise unless ``value`` is a finite number in [low, high] (None, a linked value, passes)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not a finite number; give a number from {low} to {high}.")
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is outside the allowed range {low} to {high}; give a value inside it.")


def first_error(*checks: Callable[[], object]) -> bool | str:
    """Run the checks in order: True when all pass, else the first error's message
    (what ComfyUI's ``validate_inputs`` answers)."""
    for check in checks:
        try:
            check()
        except (ValueError, TypeError) as err:
            return str(err)
    return True
