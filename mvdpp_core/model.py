"""The MVDiffusion++ model bundle: multi-view UNet, mask-aware VAE, image encoder, schedule,
and the construction of the UNet's 9-channel multi-view input.

View layout of one object: the 32 target views (rig order, view ids 0..31) followed by
the n condition views (view ids 32..32+n-1). Per view, channels are, in SD-2-inpainting
order: noisy latent (4), branch mask (1: ones for condition views, zeros for targets),
condition latent (4: ``MVAE(image, mask)`` for condition views; for targets ``MVAE(white, 0)``,
or with ``ModelConfig.target_condition = first_view`` the first condition view's latent).
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor, nn

from .cameras import NUM_TARGET_VIEWS
from .condition import Condition, encode_condition, null_condition
from .config import ModelConfig, TargetCondition
from .image_encoder import ImageEncoder
from .schedule import NoiseSchedule
from .unet import MultiViewUNet
from .vae import MaskAwareVAE


class MVDPPModel(nn.Module):
    """UNet + MVAE (+ optional image encoder) built from one ``ModelConfig``."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        unet: MultiViewUNet | None = None,
        vae: MaskAwareVAE | None = None,
        image_encoder: ImageEncoder | None = None,
        with_image_encoder: bool = True,
    ):
        super().__init__()
        config.validate()
        self.config = config
        self.unet = unet if unet is not None else MultiViewUNet(config.unet)
        self.vae = vae if vae is not None else MaskAwareVAE(config.vae)
        if image_encoder is None and with_image_encoder:
            image_encoder = ImageEncoder(config.image_encoder)
        self.image_encoder = image_encoder
        self.schedule = NoiseSchedule(config=config.schedule)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_condition(self, images: Tensor, masks: Tensor, embeddings: Tensor | None = None) -> Condition:
        """Condition of one object from framed views (n, 3, H, W) and masks (n, 1, H, W) in [0, 1]
        (``mvdpp_core.condition.encode_condition``)."""
        return encode_condition(self, images, masks, embeddings)

    def empty_latent(self, batch: int = 1) -> Tensor:
        """``MVAE(white image, zero mask)``: the condition latent of target views, (b, 4, h, w)."""
        size = self.config.image_size
        white = torch.ones(batch, 3, size, size, device=self.device, dtype=self.vae_dtype)
        return self.vae.encode(white, torch.zeros_like(white[:, :1]))

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def unet_input(
        self, noisy: Tensor, cond: Condition, empty: Tensor, target_ids: Tensor | None = None,
        first_view: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The 9-channel UNet input and view ids.

        Args:
            noisy: (b, t + n, 4, h, w) noisy latents, t target views first.
            cond: condition of n views.
            empty: (b, 4, h, w) the target-view condition latent.
            target_ids: (b, t) rig indices of the target views (training drops views);
                default all 32 in rig order.
            first_view: (b,) bool, with ``target_condition: first_view``: which objects' targets
                hold the first condition view's latent (the others hold ``empty``, the paper's
                input; training's ``stage.first_view_dropout``); default all.
        Returns:
            sample (b, t + n, 9, h, w) and view_ids (b, t + n).
        """
        b, v = noisy.shape[:2]
        n = cond.num_views
        targets = v - n
        branch = torch.cat([noisy.new_zeros(b, targets), noisy.new_ones(b, n)], dim=1)  # b v
        branch = repeat(branch, "b v -> b v 1 h w", h=noisy.shape[-2], w=noisy.shape[-1])
        target_latent = empty
        if self.config.target_condition is TargetCondition.FIRST_VIEW:
            target_latent = cond.latents[:, 0].to(empty.dtype)  # b c h w; the null condition holds empty here
            if first_view is not None:
                target_latent = torch.where(first_view[:, None, None, None], target_latent, empty)
        cond_latents = torch.cat([repeat(target_latent, "b c h w -> b t c h w", t=targets), cond.latents], dim=1)
        if target_ids is None:
            target_ids = repeat(torch.arange(targets, device=noisy.device), "t -> b t", b=b)
        cond_ids = repeat(NUM_TARGET_VIEWS + torch.arange(n, device=noisy.device), "n -> b n", b=b)
        view_ids = torch.cat([target_ids, cond_ids], dim=1)
        return torch.cat([noisy, branch, cond_latents.to(noisy.dtype)], dim=2), view_ids

    def null_condition(self, cond: Condition, empty: Tensor) -> Condition:
        """The condition with images and embeddings dropped (``mvdpp_core.condition.null_condition``)."""
        return null_condition(cond, empty)

    def predict(
        self, noisy: Tensor, t: Tensor, cond: Condition, empty: Tensor, target_ids: Tensor | None = None
    ) -> Tensor:
        """Raw UNet output (epsilon or v) for noisy latents (b, v, 4, h, w) at timesteps t (b,) or (b, v)."""
        sample, view_ids = self.unet_input(noisy, cond, empty, target_ids)
        return self.unet(sample, t, view_ids, cond.embeddings)
