"""The mask-aware VAE (MVAE): an ``AutoencoderKL`` with RGB + mask in and out.

Converted from an SD VAE so that, before fine-tuning, it is the SD VAE on RGB: the
mask input channel has zero weights, and the mask output channel has zero weights and a
bias that decodes to "foreground" everywhere.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from .config import VAEConfig

# Decoded values live in [-1, 1]; a mask-channel bias of 1 decodes to mask 1 (foreground).
_FOREGROUND_BIAS = 1.0


class MaskAwareVAE(nn.Module):
    """encode(image, mask) -> latents; decode(latents) -> (rgb, mask), all in [0, 1]."""

    def __init__(self, config: VAEConfig, vae: AutoencoderKL | None = None):
        super().__init__()
        self.config = config
        self.vae = vae if vae is not None else AutoencoderKL(**config.diffusers_kwargs())

    @classmethod
    def from_rgb_vae(cls, rgb_vae: AutoencoderKL) -> MaskAwareVAE:
        """Convert a 3-in / 3-out SD VAE: identical on RGB, mask decodes to foreground."""
        src = rgb_vae.config
        if src.in_channels != 3 or src.out_channels != 3:
            raise ValueError(
                f"expected an RGB VAE (3 in / 3 out channels), got {src.in_channels} in / "
                f"{src.out_channels} out; it may already be mask-aware."
            )
        config = VAEConfig(
            latent_channels=src.latent_channels,
            block_out_channels=tuple(src.block_out_channels),
            layers_per_block=src.layers_per_block,
            norm_num_groups=src.norm_num_groups,
            sample_size=src.sample_size if isinstance(src.sample_size, int) else src.sample_size[0],
            scaling_factor=src.scaling_factor,
        )
        mvae = cls(config)
        state = rgb_vae.state_dict()
        w_in, w_out, b_out = (
            state[k] for k in ("encoder.conv_in.weight", "decoder.conv_out.weight", "decoder.conv_out.bias")
        )
        state["encoder.conv_in.weight"] = torch.cat([w_in, torch.zeros_like(w_in[:, :1])], dim=1)
        state["decoder.conv_out.weight"] = torch.cat([w_out, torch.zeros_like(w_out[:1])], dim=0)
        state["decoder.conv_out.bias"] = torch.cat([b_out, b_out.new_full((1,), _FOREGROUND_BIAS)])
        mvae.vae.load_state_dict(state)
        return mvae

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(
        self, image: Tensor, mask: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scaled latents (n, 4, h/f, w/f) of images (n, 3, H, W) and masks (n, 1, H, W) in [0, 1].

        ``sample=False`` takes the posterior mode (inference); training samples it.
        """
        posterior = self.posterior(image, mask)
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents * self.scaling_factor

    def posterior(self, image: Tensor, mask: Tensor):
        """The unscaled latent posterior (diffusers' ``DiagonalGaussianDistribution``) of images
        (n, 3, H, W) and masks (n, 1, H, W) in [0, 1]; training samples it with its own noise."""
        x = torch.cat([image, mask], dim=1) * 2 - 1  # n 4 H W in [-1, 1]
        return self.vae.encode(x).latent_dist

    def decode(self, latents: Tensor, *, clamp: bool = True) -> tuple[Tensor, Tensor]:
        """RGB (n, 3, H, W) and mask (n, 1, H, W) in [0, 1] from scaled latents (n, 4, h, w);
        ``clamp=False`` keeps the values outside [0, 1] (and their gradients), for a loss."""
        x = (self.vae.decode(latents / self.scaling_factor).sample + 1) / 2
        x = x.clamp(0, 1) if clamp else x
        return x[:, :3], x[:, 3:]
