"""Builders of tiny, seeded models shared by the tests (no downloads, ever)."""

from __future__ import annotations

import torch

from mvdpp_core.config import preset
from mvdpp_core.model import MVDPPModel


def tiny_model(seed: int = 0, *, view_scale: float = 0.0) -> MVDPPModel:
    """The ``tiny`` preset with seeded random weights; ``view_scale`` switches on the view
    embeddings (0 = as initialised)."""
    torch.manual_seed(seed)
    model = MVDPPModel(preset("tiny")).eval()
    with torch.no_grad():
        model.unet.unet.class_embedding.scale.fill_(view_scale)
    return model


def object_views(n: int = 1, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n condition views (n, 3, size, size) of a coloured disc on white, and masks (n, size, size)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    images, masks = [], []
    for i in range(n):
        cx, cy = size * (0.4 + 0.2 * torch.rand(2, generator=g))
        mask = (((xs - cx) ** 2 + (ys - cy) ** 2) < (size * (0.2 + 0.05 * i)) ** 2).float()
        colour = torch.rand(3, 1, 1, generator=g)
        images.append(mask * colour + (1 - mask))
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)
