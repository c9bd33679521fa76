"""The camera plan of one rendered object (``train.data.plan.camera_plan``) per object seed,
handed to the renderer as JSON, so the Blender binary's bundled Python never needs torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.plan import DEFAULT_NUM_CONDITIONS, camera_plan

__all__ = ["DEFAULT_NUM_CONDITIONS", "camera_plan", "object_seed", "write_plan"]


def object_seed(uid: str, seed: int) -> int:
    """A stable per-object seed (independent of the order objects are rendered in)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def write_plan(path: str | Path, plan: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(plan))
    return path
