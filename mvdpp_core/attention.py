"""Global multi-view attention: one diffusers attention processor, one backend switch.

Every self-attention layer (``attn1``) of the UNet attends over the tokens of *all* views
of an object at once: the processor reshapes ``(b v) l c -> b (v l) c`` before attention
and back after. Cross-attention (``attn2``) stays per view. The attention kernel (PyTorch
SDPA by default, xformers on CUDA when installed) is chosen in ``attend`` only.

View parallelism: when one object's views are split across the ranks of a process group
(``view_group``), each rank keeps its own queries and all-gathers keys and values, so the
result equals global attention over all views on one device, with a differentiable
gather (gradients flow back to the rank that owns each view). The attention biases (epipolar,
condition-key) are built from every rank's view ids (``gather_view_ids``): the rows of this
rank's queries against the keys of all views.
"""

from __future__ import annotations

import enum
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import Tensor

from .common import parse_enum
from .geometry import epipolar_bias, tokens_at


class AttentionBackend(str, enum.Enum):
    AUTO = "auto"
    SDPA = "sdpa"
    XFORMERS = "xformers"


def resolve_backend(backend: AttentionBackend | str, device: torch.device) -> AttentionBackend:
    """Pick the concrete backend: xformers only on CUDA and only when importable."""
    backend = _as_backend(backend)
    has_xformers = importlib.util.find_spec("xformers") is not None
    if backend is AttentionBackend.AUTO:
        return AttentionBackend.XFORMERS if device.type == "cuda" and has_xformers else AttentionBackend.SDPA
    if backend is AttentionBackend.XFORMERS and not (device.type == "cuda" and has_xformers):
        raise ValueError(
            f"attention backend 'xformers' needs CUDA and the xformers package (device={device}, "
            f"xformers installed={has_xformers}); install it with `pip install xformers` matching "
            "your torch build, or use backend 'sdpa'."
        )
    return backend


def _as_backend(backend: AttentionBackend | str) -> AttentionBackend:
    return parse_enum(AttentionBackend, backend, "attention backend")


def attend(
    q: Tensor, k: Tensor, v: Tensor, heads: int, backend: AttentionBackend, bias: Tensor | None = None
) -> Tensor:
    """Multi-head attention (n, l, h*d) -> (n, l, h*d) with the chosen kernel; ``bias``
    (n or 1, h or 1, l, l) is added to the logits (SDPA then, whatever the backend)."""
    if backend is AttentionBackend.XFORMERS and bias is None:
        import xformers.ops as xops

        q, k, v = (rearrange(t, "n l (h d) -> n l h d", h=heads) for t in (q, k, v))
        out = xops.memory_efficient_attention(q, k, v)
        return rearrange(out, "n l h d -> n l (h d)")
    q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    return rearrange(out, "n h l d -> n l (h d)")


class EpipolarCache:
    """The epipolar bias of one set of view ids, built once per token count and gain and shared by
    the layers (and, while the ids stay the same, by the calls of a sampling run).

    ``queries``: the views whose rows are needed (all; under view parallelism this rank's share of
    ``view_ids``, which then holds every rank's views)."""

    def __init__(self, view_ids: Tensor, queries: slice | None = None):
        # Objects with the same views (a guidance batch, a batch of one rig) share one bias.
        same = bool((view_ids == view_ids[:1]).all())
        self.view_ids = view_ids[:1] if same else view_ids  # b' v
        self.queries = queries
        self._base: dict[int, Tensor] = {}  # tokens per view -> (b', q l, v l) log-weights
        self._scaled: dict[tuple[int, tuple[float, ...]], Tensor] = {}  # (tokens, gains) -> bias

    def matches(self, view_ids: Tensor, queries: slice | None = None) -> bool:
        ids = self.view_ids
        return (
            ids.device == view_ids.device
            and view_ids.shape[1] == ids.shape[1]
            and queries == self.queries
            and bool((view_ids == ids).all())
        )

    def __call__(self, tokens: int, gain: Tensor) -> Tensor:
        """(b' or 1, h or 1, q l, v l): ``gain`` (h,) times the log-weights, one head when all are equal."""
        gains = tuple(gain.tolist())
        if (tokens, gains) not in self._scaled:
            if tokens not in self._base:
                self._base[tokens] = epipolar_bias(self.view_ids, tokens, self.queries)
            base = self._base[tokens]
            if set(gains) == {1.0}:  # the log-weights themselves: no second (v l)^2 copy
                self._scaled[tokens, gains] = base[:, None]
            else:
                scale = gain[:1] if len(set(gains)) == 1 else gain
                self._scaled[tokens, gains] = scale[:, None, None].to(base) * base[:, None]
        return self._scaled[tokens, gains]


@dataclass(frozen=True)
class ViewShards:
    """View parallelism with unequal shares: rank r of ``group`` holds ``counts[r]`` views of
    each object (e.g. 32 targets + 10 condition views over 8 ranks: 5, 5, 5, 6, 5, 5, 5, 6)."""

    group: torch.distributed.ProcessGroup
    counts: tuple[int, ...]


def gather_views(x: Tensor, group: torch.distributed.ProcessGroup | ViewShards) -> Tensor:
    """Concatenate (b, n, c) token sequences of all ranks in ``group`` along n (differentiable).

    A plain process group needs the same n on every rank; ``ViewShards`` pads each rank's
    tokens to the longest share for the collective and trims the padding off again.
    """
    from torch.distributed.nn.functional import all_gather

    if not isinstance(group, ViewShards):
        return torch.cat(all_gather(x.contiguous(), group=group), dim=1)
    tokens = x.shape[1] // group.counts[torch.distributed.get_rank(group.group)]  # per view
    padded = F.pad(x, (0, 0, 0, max(group.counts) * tokens - x.shape[1]))  # b n' c
    parts = all_gather(padded.contiguous(), group=group.group)
    return torch.cat([part[:, : count * tokens] for part, count in zip(parts, group.counts, strict=True)], dim=1)


def gather_view_ids(view_ids: Tensor, group: torch.distributed.ProcessGroup | ViewShards) -> tuple[Tensor, slice]:
    """Every rank's view ids of each object, (b, v) -> (b, V) in rank order, and the slice of
    them this rank holds: what an attention bias over all key views needs."""
    ids = gather_views(view_ids[..., None], group)[..., 0]
    if isinstance(group, ViewShards):
        start = sum(group.counts[: torch.distributed.get_rank(group.group)])
    else:
        start = torch.distributed.get_rank(group) * view_ids.shape[1]
    return ids, slice(start, start + view_ids.shape[1])


class MultiViewAttnProcessor:
    """diffusers attention processor; global over views when ``global_views`` is set.

    ``num_views`` (and ``geometry``, the per-view token geometry of ``mvdpp_core.geometry``)
    arrive through ``cross_attention_kwargs`` on every UNet call. ``geometry_proj`` (owned by
    the UNet's ``GeometryEncoding``, held here by reference) maps a token's geometry to terms
    added to its query, key and output: attention can then address views and positions.
    ``epipolar`` (the layer's ``HeadGain`` of the UNet's ``EpipolarAttention``) scales the
    epipolar bias of ``mvdpp_core.geometry`` per head. ``cosine`` (the layer's ``CosineScale``
    of the UNet's ``CosineAttention``) makes the logits a per-head temperature times cos(q, k).
    ``condition`` (the layer's ``HeadGain`` of the UNet's ``ConditionAttentionBias``) adds
    ``gain[h]`` times ``condition_keys`` (b, v), per key view (every rank's views under view
    parallelism), to the logits. ``length_reference`` R > 0 multiplies the query-key logits of
    global attention by log(L) / log(R * l) (``UNetConfig.length_scaled_attention``), L the keys
    over every view (every rank's), l one view's tokens; the biases are added unscaled.
    """

    def __init__(
        self,
        *,
        global_views: bool,
        backend: AttentionBackend = AttentionBackend.SDPA,
        geometry_proj: torch.nn.Linear | None = None,
        epipolar: torch.nn.Module | None = None,
        cosine: torch.nn.Module | None = None,
        condition: torch.nn.Module | None = None,
        length_reference: int = 0,
    ):
        self.global_views = global_views
        self.length_reference = length_reference
        self.backend = backend
        self.geometry_proj = geometry_proj
        self.epipolar = epipolar
        self.cosine = cosine
        self.condition = condition

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_views: int = 1,
        view_group: torch.distributed.ProcessGroup | ViewShards | None = None,
        geometry: Tensor | None = None,
        epipolar: EpipolarCache | None = None,
        condition_keys: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError("MultiViewAttnProcessor does not take an attention mask.")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            n, c, height, width = hidden_states.shape
            hidden_states = rearrange(hidden_states, "n c h w -> n (h w) c")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_self = encoder_hidden_states is None
        context = hidden_states if is_self else encoder_hidden_states
        if not is_self and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out_geometry = None
        if is_self and self.geometry_proj is not None and geometry is not None:
            g = self.geometry_proj(tokens_at(geometry, q.shape[1]).to(q.dtype))  # (b v) l (2 inner + c)
            q_g, k_g, out_geometry = g.split([q.shape[-1], k.shape[-1], g.shape[-1] - 2 * q.shape[-1]], dim=-1)
            q, k = q + q_g, k + k_g
        if is_self and self.cosine is not None:
            q, k = self.cosine(q, k)
        if is_self and self.global_views and (num_views > 1 or view_group is not None):
            # All views of one object attend to each other: one sequence per object. (A rank of a
            # view group may hold a single view: it still gathers the others'.)
            q, k, v = (rearrange(t, "(b v) l c -> b (v l) c", v=num_views) for t in (q, k, v))
            bias = None
            tokens = q.shape[1] // num_views
            if self.epipolar is not None and epipolar is not None:
                bias = epipolar(tokens, self.epipolar.gain)  # rows: this rank's views; columns: all views
            if self.condition is not None and condition_keys is not None:
                keys = condition_keys.to(q.dtype).repeat_interleave(tokens, dim=1)  # b (v l)
                per_head = self.condition.gain.to(q.dtype)[None, :, None, None] * keys[:, None, None, :]  # b h 1 L
                bias = per_head if bias is None else bias + per_head
            if view_group is not None:  # the other ranks hold the object's other views
                k, v = gather_views(k, view_group), gather_views(v, view_group)
            if self.length_reference:  # scaling q scales q.k and leaves the biases as they are
                q = q * (math.log(k.shape[1]) / math.log(self.length_reference * tokens))
            out = attend(q, k, v, attn.heads, self.backend, bias)
            out = rearrange(out, "b (v l) c -> (b v) l c", v=num_views)
        else:
            out = attend(q, k, v, attn.heads, self.backend)

        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if out_geometry is not None:
            out = out + out_geometry
        if spatial:
            out = rearrange(out, "n (h w) c -> n c h w", h=height, w=width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def multiview_processors(
    attn_names: list[str],
    *,
    global_attention: bool,
    backend: AttentionBackend,
    geometry_projs: dict[str, torch.nn.Linear] | None = None,
    epipolar_gains: dict[str, torch.nn.Module] | None = None,
    cosine_scales: dict[str, torch.nn.Module] | None = None,
    condition_gains: dict[str, torch.nn.Module] | None = None,
    length_reference: int = 0,
) -> dict[str, MultiViewAttnProcessor]:
    """Processor map for ``unet.set_attn_processor``: attn1 global, attn2 per view;
    ``geometry_projs``, ``epipolar_gains``, ``cosine_scales`` and ``condition_gains`` by processor
    name (attn1 layers) when the UNet has a geometry encoding, epipolar or cosine attention, or
    the condition-key bias; ``length_reference`` for every global attention layer."""
    geometry_projs, epipolar_gains = geometry_projs or {}, epipolar_gains or {}
    cosine_scales, condition_gains = cosine_scales or {}, condition_gains or {}
    return {
        name: MultiViewAttnProcessor(
            global_views=global_attention and name.endswith("attn1.processor"),
            backend=backend,
            geometry_proj=geometry_projs.get(name),
            epipolar=epipolar_gains.get(name),
            cosine=cosine_scales.get(name),
            condition=condition_gains.get(name),
            length_reference=length_reference,
        )
        for name in attn_names
    }
