"""CLIP image embeddings of the condition views: one cross-attention token per view.

A transformers ``CLIPVisionModelWithProjection`` built from config (``tiny``) or loaded
from a local folder or ``.safetensors`` file. Never a hub download.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .config import ImageEncoderConfig

# OpenAI / OpenCLIP preprocessing statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _config_of(c: CLIPVisionConfig) -> ImageEncoderConfig:
    """Our config from a transformers one: the fields share their names."""
    return ImageEncoderConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(ImageEncoderConfig)})


def clip_vision_config(config: ImageEncoderConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(**dataclasses.asdict(config))


class ImageEncoder(nn.Module):
    """Images (n, 3, H, W) in [0, 1] on white -> projected embeddings (n, projection_dim)."""

    def __init__(self, config: ImageEncoderConfig, model: CLIPVisionModelWithProjection | None = None):
        super().__init__()
        self.config = config
        self.model = model if model is not None else CLIPVisionModelWithProjection(clip_vision_config(config))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_local(cls, path: str | Path, *, num_attention_heads: int | None = None,
                   hidden_act: str = "gelu") -> ImageEncoder:
        """Load CLIP vision weights from local disk, never from a hub.

        ``path`` is a transformers folder (config.json + weights, e.g. the ``image_encoder``
        folder of SD 2 unCLIP or IP-Adapter) or a single ``.safetensors`` file in the
        transformers key layout (e.g. ComfyUI's ``clip_vision_h.safetensors``). A file carries
        no config: the shapes give it, except the head count (default: 64-d heads, as in
        every OpenAI / OpenCLIP ViT) and the activation (``gelu`` for OpenCLIP ViT-H/14).
        """
        path = Path(path)
        if path.is_file():
            return cls._from_file(path, num_attention_heads, hidden_act)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is neither a .safetensors file nor a transformers CLIP vision folder (no "
                "config.json); pass a folder saved with CLIPVisionModelWithProjection.save_pretrained."
            )
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, use_safetensors=True)
        return cls(_config_of(model.config), model)

    @classmethod
    def _from_file(cls, path: Path, num_attention_heads: int | None, hidden_act: str) -> ImageEncoder:
        if path.suffix != ".safetensors":
            raise ValueError(f"{path.name}: only .safetensors CLIP vision files are loaded (never pickles).")
        state = load_file(str(path))
        state = {k.removeprefix("image_encoder."): v for k, v in state.items()}
        try:
            patch = state["vision_model.embeddings.patch_embedding.weight"]  # hidden 3 p p
            positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
            projection = state["visual_projection.weight"].shape[0]
            intermediate = state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        except KeyError as err:
            raise ValueError(
                f"{path.name} is not a CLIP vision model with projection in transformers layout "
                f"(missing {err}); use a CLIPVisionModelWithProjection checkpoint."
            ) from None
        hidden, patch_size = patch.shape[0], patch.shape[-1]
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
        config = ImageEncoderConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=num_attention_heads or hidden // 64,
            image_size=round((positions - 1) ** 0.5) * patch_size,
            patch_size=patch_size,
            projection_dim=projection,
            hidden_act=hidden_act,
        )
        encoder = cls(config)
        state.pop("vision_model.embeddings.position_ids", None)
        encoder.model.load_state_dict(state, strict=True)
        return encoder

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize (bicubic, antialiased) to the encoder's size and normalise."""
        size = self.config.image_size
        # float32: the CPU's antialiased bicubic has no bf16 kernel (a bf16 model on a CPU failed here)
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, images: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=self.preprocess(images).to(dtype)).image_embeds
