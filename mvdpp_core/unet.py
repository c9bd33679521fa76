"""The multi-view UNet: diffusers' SD-2-inpainting UNet with global attention and view ids.

``MultiViewUNet`` holds a plain ``UNet2DConditionModel`` (so SD 2 inpainting weights load
unchanged) and changes it in exactly two places:

* every attention processor is a ``MultiViewAttnProcessor`` (attn1 global over views);
* ``unet.class_embedding`` is a ``ViewIndexEmbedding``: 42 learnable vectors times a
  trainable scale that starts at 0, which diffusers adds to each view's timestep
  embedding. At initialisation the model is therefore exactly its SD base, per view.

With ``UNetConfig.geometry_encoding`` a third, ``GeometryEncoding``, adds the per-token
geometry of ``mvdpp_core.geometry`` to every global attention layer through new weights,
zero at initialisation (the base is kept exactly); a model trained from scratch starts them
random (``GeometryEncoding.reset_parameters``) so that geometry acts from the first step.
With ``UNetConfig.epipolar_attention`` a fourth, ``EpipolarAttention``, adds the rig's epipolar
log-weights (``geometry.epipolar_bias``) to every global attention layer's logits, times a
fixed per-head gain: 0 at initialisation (the base is kept), ``init.epipolar_gain`` from scratch.
With ``UNetConfig.cosine_attention`` a fifth, ``CosineAttention``, makes every global attention
layer's logits a learned per-head temperature times the cosine of query and key (Swin V2's
scaled cosine attention): attention is then peaked from the first step whatever the scale of
the new weights. It changes an initialised model, so it is for models trained from scratch.
With ``UNetConfig.condition_attention_bias`` a sixth, ``ConditionAttentionBias``, adds a fixed
per-head gain times log(number of target views) to every global attention logit on a condition
view's key: 0 at initialisation (the base is kept), ``init.condition_bias_gain`` from scratch.
``UNetConfig.length_scaled_attention`` adds no weights: the processors multiply global
attention's query-key logits by log(keys) / log(keys at the reference view count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from einops import rearrange, repeat
from torch import Tensor, nn

from .attention import (
    AttentionBackend,
    EpipolarCache,
    ViewShards,
    gather_view_ids,
    multiview_processors,
    resolve_backend,
)
from .cameras import NUM_TARGET_VIEWS
from .config import UNetConfig
from .geometry import GEOMETRY_CHANNELS, token_geometry


class ViewIndexEmbedding(nn.Module):
    """Per-view-slot vectors scaled by a scalar initialised to zero."""

    def __init__(self, num_slots: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_slots, dim)
        nn.init.normal_(self.embedding.weight, std=1.0)
        # Shape (1,), not (): FSDP2's fully_shard refuses 0-dim parameters.
        self.scale = nn.Parameter(torch.zeros(1))
        self.register_load_state_dict_pre_hook(_scale_as_vector)

    def forward(self, view_ids: Tensor) -> Tensor:
        return self.scale * self.embedding(view_ids)


class GeometryEncoding(nn.Module):
    """One linear map per global attention layer: token geometry -> (query, key, output) terms."""

    def __init__(self, layer_dims: dict[str, tuple[int, int]]):
        """``layer_dims``: attn1 processor name -> (inner dim of q / k, output dim)."""
        super().__init__()
        self.names = list(layer_dims)
        self.projs = nn.ModuleList(
            nn.Linear(GEOMETRY_CHANNELS, 2 * inner + out, bias=False) for inner, out in layer_dims.values()
        )
        self.reset_parameters(0.0)

    def reset_parameters(self, std: float) -> None:
        """Zero (``std=0``: the model equals its base) or normal(0, std) weights."""
        for proj in self.projs:
            nn.init.normal_(proj.weight, std=std) if std > 0 else nn.init.zeros_(proj.weight)

    def by_processor(self) -> dict[str, nn.Linear]:
        return dict(zip(self.names, self.projs, strict=True))


class HeadGain(nn.Module):
    """One global attention layer's gain per head for a fixed attention bias (``gain[h]`` times the
    bias's log-weights): the epipolar bias (``EpipolarAttention``) or the condition-key bias
    (``ConditionAttentionBias``).

    A fixed buffer (stored in checkpoints), not a parameter: a bias that needs a gradient makes
    PyTorch's SDPA materialise and differentiate the (b, h, l, l) logits, 4x the attention's time
    on CPU, and a learned gain moved by under 1 % in 400 steps (Adam moves it by at most the
    learning rate per step).
    """

    def __init__(self, heads: int):
        super().__init__()
        self.register_buffer("gain", torch.zeros(heads))


class PerLayer(nn.Module):
    """One small module per global attention layer, handed to that layer's processor by name."""

    def __init__(self, layer_heads: dict[str, int], make: type[nn.Module]):
        """``layer_heads``: attn1 processor name -> heads; ``make(heads)`` builds a layer's module."""
        super().__init__()
        self.names = list(layer_heads)
        self.layers = nn.ModuleList(make(h) for h in layer_heads.values())

    def by_processor(self) -> dict[str, nn.Module]:
        return dict(zip(self.names, self.layers, strict=True))


class HeadGains(PerLayer):
    """A ``HeadGain`` per global attention layer."""

    def __init__(self, layer_heads: dict[str, int]):
        super().__init__(layer_heads, HeadGain)

    @torch.no_grad()
    def reset_parameters(self, gain: float) -> None:
        """Gain 0 (global attention as without the bias: the model equals its base) or ``gain``."""
        for layer in self.layers:
            layer.gain.fill_(gain)


class EpipolarAttention(HeadGains):
    """The epipolar bias's gains (``UNetConfig.epipolar_attention``)."""


class ConditionAttentionBias(HeadGains):
    """The condition-key bias's gains (``UNetConfig.condition_attention_bias``): in global
    attention every query's logit on a condition-view key gets ``gain[h] * log(T)``, T the
    object's number of target views. At gain 1, where attention is uniform, each condition view
    draws as much mass as all T target views together, for any T: training on 6 targets and
    sampling 32 then give the condition the same share (without it, 1/7 and 1/33)."""


class CosineScale(nn.Module):
    """One global attention layer's scaled cosine attention: queries and keys are unit vectors per
    head, and the logit of a pair is ``exp(log_scale[h]) * cos(q, k)``."""

    MAX_SCALE = 100.0  # Swin V2's clamp: a temperature above it would make attention one-hot

    def __init__(self, heads: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(heads))

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(n, l, h*d) queries and keys -> the same, rescaled so that the usual ``q k / sqrt(d)``
        of ``attention.attend`` is the scaled cosine (attend and its diagnostics stay unchanged)."""
        heads = self.log_scale.shape[0]
        qh, kh = (rearrange(t, "n l (h d) -> n l h d", h=heads) for t in (q, k))
        scale = self.log_scale.clamp(max=math.log(self.MAX_SCALE)).exp() * math.sqrt(qh.shape[-1])
        qh = F.normalize(qh, dim=-1) * scale[:, None].to(qh.dtype)
        kh = F.normalize(kh, dim=-1)
        return rearrange(qh, "n l h d -> n l (h d)"), rearrange(kh, "n l h d -> n l (h d)")


class CosineAttention(PerLayer):
    """A ``CosineScale`` per global attention layer (``UNetConfig.cosine_attention``)."""

    def __init__(self, layer_heads: dict[str, int], scale: float = 10.0):
        super().__init__(layer_heads, CosineScale)
        self.reset_parameters(scale)

    @torch.no_grad()
    def reset_parameters(self, scale: float) -> None:
        """Every head's temperature to ``scale`` (Swin V2 starts at 10)."""
        if not 0 < scale <= CosineScale.MAX_SCALE:
            raise ValueError(
                f"cosine attention temperature {scale} must lie in (0, {CosineScale.MAX_SCALE:g}]; "
                "10 is the usual start."
            )
        for layer in self.layers:
            layer.log_scale.fill_(math.log(scale))


def condition_key_weights(view_ids: Tensor) -> Tensor:
    """(b, v) float: log(T) for the condition views (ids >= 32), 0 for targets; T = the object's
    number of target views (at least 1)."""
    cond = view_ids >= NUM_TARGET_VIEWS
    targets = (~cond).sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(cond, targets.float().log(), torch.zeros((), device=view_ids.device))


def _scale_as_vector(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load a 0-dim ``scale`` (bundles and checkpoints written before it became (1,)) as (1,)."""
    key = prefix + "scale"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)


class MultiViewUNet(nn.Module):
    """UNet over all views of an object: input (b, v, 9, h, w) -> output (b, v, 4, h, w)."""

    def __init__(self, config: UNetConfig, unet: UNet2DConditionModel | None = None):
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else UNet2DConditionModel(**config.diffusers_kwargs())
        time_embed_dim = self.unet.time_embedding.linear_2.out_features
        self.unet.class_embedding = ViewIndexEmbedding(config.num_view_slots, time_embed_dim)
        if config.geometry_encoding:  # inside the diffusers UNet: bundles store its tensors as unet.geometry_encoding.*
            self.unet.geometry_encoding = GeometryEncoding(self._attn1_dims())
        heads = {f"{n}.processor": m.heads for n, m in self.unet.named_modules() if n.endswith("attn1")}
        if config.epipolar_attention:
            self.unet.epipolar_attention = EpipolarAttention(heads)
        if config.cosine_attention:
            self.unet.cosine_attention = CosineAttention(heads)
        if config.condition_attention_bias:
            self.unet.condition_attention_bias = ConditionAttentionBias(heads)
        self._epipolar_cache: EpipolarCache | None = None  # the last view ids' bias (a sampling run's)
        self.set_attention_backend(AttentionBackend.SDPA)

    @property
    def geometry(self) -> GeometryEncoding | None:
        return getattr(self.unet, "geometry_encoding", None)

    @property
    def epipolar(self) -> EpipolarAttention | None:
        return getattr(self.unet, "epipolar_attention", None)

    @property
    def cosine(self) -> CosineAttention | None:
        return getattr(self.unet, "cosine_attention", None)

    @property
    def condition_bias(self) -> ConditionAttentionBias | None:
        return getattr(self.unet, "condition_attention_bias", None)

    def _attn1_dims(self) -> dict[str, tuple[int, int]]:
        """attn1 processor name -> (inner dim, output dim) of every self-attention layer."""
        return {
            f"{name}.processor": (module.inner_dim, module.out_dim)
            for name, module in self.unet.named_modules()
            if name.endswith("attn1")
        }

    def set_attention_backend(self, backend: AttentionBackend | str, *, global_attention: bool | None = None) -> None:
        """Install our processors with the given kernel ('auto', 'sdpa' or 'xformers')."""
        device = next(self.parameters()).device
        global_attention = self.config.global_attention if global_attention is None else global_attention
        self.unet.set_attn_processor(
            multiview_processors(
                list(self.unet.attn_processors),
                global_attention=global_attention,
                backend=resolve_backend(backend, device),
                geometry_projs=self.geometry.by_processor() if self.geometry is not None else None,
                epipolar_gains=self.epipolar.by_processor() if self.epipolar is not None else None,
                cosine_scales=self.cosine.by_processor() if self.cosine is not None else None,
                condition_gains=self.condition_bias.by_processor() if self.condition_bias is not None else None,
                length_reference=self.config.length_scaled_attention,
            )
        )

    def forward(
        self,
        sample: Tensor,
        timesteps: Tensor,
        view_ids: Tensor,
        context: Tensor,
        view_group: torch.distributed.ProcessGroup | ViewShards | None = None,
    ) -> Tensor:
        """Denoise all views of each object jointly.

        Args:
            sample: (b, v, 9, h, w) noisy latent, branch mask, condition latent per view.
            timesteps: (b,) or (b, v) integer or float timesteps.
            view_ids: (b, v) long, 0..31 target slots, 32..41 condition slots.
            context: (b, n, d) cross-attention tokens (CLIP embeddings of the condition views),
                shared by every view of the object.
            view_group: view parallelism: the process group whose ranks hold the other views
                of the same objects (every rank the same b and v, or the shares of a
                ``ViewShards``); None = all views here. ``view_ids`` are then this rank's.
        Returns:
            (b, v, 4, h, w) the model output (epsilon or v, per the schedule config).
        """
        b, v = sample.shape[:2]
        if timesteps.ndim == 1:
            timesteps = repeat(timesteps, "b -> b v", v=v)
        kwargs = {"num_views": v, "view_group": view_group}
        if self.geometry is not None:
            ids = rearrange(view_ids, "b v -> (b v)")
            kwargs["geometry"] = token_geometry(ids, sample.shape[-1]).to(sample.dtype)  # (b v) g h w
        # The biases are over all key views: under view parallelism, every rank's view ids.
        all_ids, queries = view_ids, None
        if view_group is not None and (self.epipolar is not None or self.condition_bias is not None):
            all_ids, queries = gather_view_ids(view_ids, view_group)
        if self.epipolar is not None:
            if self._epipolar_cache is None or not self._epipolar_cache.matches(all_ids, queries):
                self._epipolar_cache = EpipolarCache(all_ids, queries)
            kwargs["epipolar"] = self._epipolar_cache
        if self.condition_bias is not None:
            kwargs["condition_keys"] = condition_key_weights(all_ids)
        out = self.unet(
            rearrange(sample, "b v c h w -> (b v) c h w"),
            rearrange(timesteps, "b v -> (b v)"),
            encoder_hidden_states=repeat(context, "b n d -> (b v) n d", v=v),
            class_labels=rearrange(view_ids, "b v -> (b v)"),
            cross_attention_kwargs=kwargs,
            return_dict=False,
        )[0]
        return rearrange(out, "(b v) c h w -> b v c h w", b=b)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
