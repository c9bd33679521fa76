"""The mask-aware VAE converted from an RGB SD VAE."""

import pytest
import torch
from diffusers import AutoencoderKL

from mvdpp_core.config import preset
from mvdpp_core.vae import MaskAwareVAE


@pytest.fixture(scope="module")
def rgb_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    kwargs = {**preset("tiny").vae.diffusers_kwargs(), "in_channels": 3, "out_channels": 3}
    vae = AutoencoderKL(**kwargs).eval()
    with torch.no_grad():  # a non-trivial output bias, so the RGB check is not vacuous
        vae.decoder.conv_out.bias.normal_(0, 0.1)
    return vae


@torch.no_grad()
def test_converted_mvae_reproduces_the_rgb_vae_and_decodes_foreground(rgb_vae):
    mvae = MaskAwareVAE.from_rgb_vae(rgb_vae).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float()
    latents = mvae.encode(image, mask)
    ref_latents = rgb_vae.encode(image * 2 - 1).latent_dist.mode() * rgb_vae.config.scaling_factor
    torch.testing.assert_close(latents, ref_latents, atol=1e-5, rtol=1e-5)
    rgb, decoded_mask = mvae.decode(latents)
    ref = ((rgb_vae.decode(ref_latents / rgb_vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(rgb, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded_mask, torch.ones_like(decoded_mask))


def test_mask_aware_vae_is_not_converted_twice(rgb_vae):
    mvae = MaskAwareVAE.from_rgb_vae(rgb_vae)
    with pytest.raises(ValueError, match="already be mask-aware"):
        MaskAwareVAE.from_rgb_vae(mvae.vae)
