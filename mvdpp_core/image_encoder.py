"""CLIP image embeddings of the condition views: one cross-attention token per view.

A transformers ``CLIPVisionModelWithProjection`` built from config (``tiny``) or loaded
from a local folder or ``.safetensors`` file. Never a hub download.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .config import ImageEncoderConfig

# OpenAI / OpenCLIP preprocessing statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_vision_config(config: ImageEncoderConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.projection_dim,
        hidden_act=config.hidden_act,
    )


class ImageEncoder(nn.Module):
    """Images (n, 3, H, W) in [0, 1] on white -> projected embeddings (n, projection_dim)."""

    def __init__(self, config: ImageEncoderConfig, model: CLIPVisionModelWithProjection | None = None):
        super().__init__()
        self.config = config
        self.model = model if model is not None else CLIPVisionModelWithProjection(clip_vision_config(config))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_local(cls, path: str | Path) -> "ImageEncoder":
        """Load a transformers CLIP vision folder (config.json + weights) from local disk."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a transformers CLIP vision folder (no config.json); pass a folder "
                "saved with CLIPVisionModelWithProjection.save_pretrained, e.g. the image_encoder "
                "folder of an SD 2 unCLIP or IP-Adapter download."
            )
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, use_safetensors=True)
        c = model.config
        config = ImageEncoderConfig(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            image_size=c.image_size,
            patch_size=c.patch_size,
            projection_dim=c.projection_dim,
            hidden_act=c.hidden_act,
        )
        return cls(config, model)

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize (bicubic, antialiased) to the encoder's size and normalise."""
        size = self.config.image_size
        x = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, images: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=self.preprocess(images).to(dtype)).image_embeds
