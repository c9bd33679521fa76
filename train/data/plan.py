"""The cameras of one object: the 32 rig views plus N sampled condition views, as a
cameras.json document (``format.cameras_document``). The Blender pipeline
(``train.render``), the procedural renderer and the synthetic test data all render this plan.
"""

from __future__ import annotations

from typing import Any

import torch

from mvdpp_core import cameras as cam

from . import format as fmt

DEFAULT_NUM_CONDITIONS = 10


def camera_plan(image_size: int, num_conditions: int = DEFAULT_NUM_CONDITIONS, seed: int = 0) -> dict[str, Any]:
    """A cameras.json document (without normalisation) for the rig + sampled condition views."""
    views = cam.rig_views()
    rig = cam.rig_c2w(torch.float64)  # 32 4 4
    targets = [
        fmt.view_record(fmt.target_file(i), i, v.azimuth_deg, v.elevation_deg, v.distance, rig[i].numpy())
        for i, v in enumerate(views)
    ]
    generator = torch.Generator().manual_seed(seed)
    sampled = cam.sample_condition_cameras(num_conditions, generator)
    c2w = cam.spherical_c2w(
        torch.tensor([c.azimuth_deg for c in sampled]),
        torch.tensor([c.elevation_deg for c in sampled]),
        torch.tensor([c.distance for c in sampled]),
    )  # n 4 4
    conditions = [
        fmt.view_record(fmt.cond_file(j), j, c.azimuth_deg, c.elevation_deg, c.distance, c2w[j].numpy())
        for j, c in enumerate(sampled)
    ]
    return fmt.cameras_document(
        image_size=image_size, K=cam.intrinsics(image_size).numpy(), targets=targets, conditions=conditions
    )
