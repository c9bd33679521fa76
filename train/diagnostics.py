"""Measurements of how information flows from the condition views to the target views.

* ``attention_flow``: per global attention layer, the softmax mass that target-view queries
  put on condition-view keys (against the uniform share ``n_cond / v``), and the attention
  entropy normalised by its maximum (1 = uniform: attention is a global mean over views).
* ``condition_share``: the x0 error of target views with the object's own condition vs
  another object's condition, at a fixed noise level: ``1 - err_own / err_other``. 0 means
  the condition does not inform the targets; near 1, it decides them.
* ``sibling_share``: does a target view read the other views? The x0 error of a probe view
  at high noise with every other view at low noise (they show most of the object) against the
  same with them at its own noise, as in training and sampling: ``1 - err_low / err_high``. 0
  when the probe view reads nothing of them (per-view attention makes it exactly 0); near 1,
  they decide it: the cross-view path a long sampler needs for its views to agree.
* ``silhouette_consistency``: carve the visual hull of 32 masks on the rig, project it back
  and take the IoU with the masks: ~0.99 for the true views of one object; masks that do not
  describe one 3D object carve to little and score low. ``hull_masks`` is that projection,
  optionally of a consensus hull that lets each voxel ignore a few views.
* ``single_view_hull``: an input view reprojected into the rig through its own visual hull, a
  baseline that follows its input and is consistent in 3D by construction.
* ``mask_placement`` and ``best_common_scale``: is a mask's error its size and position, or its
  shape? (the copy test, ``scripts/size_probe.py``)
* ``mesh_errors``: volume IoU and Chamfer distance against the true mesh of the fast-path
  reconstruction of 32 views, the issue's mesh figures, with the Chamfer distance's two halves
  (accuracy and completeness) and the volume ratio.

Used by ``scripts/eval_default.py``, ``scripts/overfit_default.py`` and ``train.regression_bar``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import trimesh
from einops import rearrange
from torch import Tensor

from mvdpp_core import attention as attention_module
from mvdpp_core.cameras import NUM_TARGET_VIEWS, TARGET_DISTANCE, intrinsics, pixel_rays, project, rig_c2w
from mvdpp_core.geometry import OBJECT_RADIUS
from mvdpp_core.model import Condition, MVDPPModel
from mvdpp_core.reconstruction import reconstruct
from mvdpp_core.reconstruction.metrics import chamfer_terms, volume_overlap


@dataclass
class LayerFlow:
    """Attention statistics of one global attention layer (means over objects, heads, queries)."""

    cond_mass: float  # mass target queries put on condition keys
    uniform_mass: float  # what uniform attention would put there: n_cond / v
    own_view_mass: float  # mass target queries put on their own view's keys
    entropy: float  # normalised: 1 = uniform over all keys


@contextlib.contextmanager
def recording_attention(num_views: int, num_cond: int) -> Iterator[list[LayerFlow]]:
    """Record ``LayerFlow`` for every global attention call inside the block (math attention)."""
    records: list[LayerFlow] = []
    original = attention_module.attend

    def attend(q: Tensor, k: Tensor, v: Tensor, heads: int, backend, bias: Tensor | None = None) -> Tensor:
        length = q.shape[1]
        if length != k.shape[1] or length % num_views:  # cross-attention or per-view attention
            return original(q, k, v, heads, backend, bias)
        tokens = length // num_views
        qh, kh = (rearrange(t, "n l (h d) -> n h l d", h=heads).float() for t in (q, k))
        logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])  # n h lq lk
        probs = torch.softmax(logits if bias is None else logits + bias.float(), dim=-1)
        targets = (num_views - num_cond) * tokens
        p_t = probs[:, :, :targets]  # target queries
        cond_mass = p_t[..., targets:].sum(-1).mean().item()
        per_view = rearrange(p_t, "n h (vq lq) (vk lk) -> n h vq lq vk lk", lq=tokens, lk=tokens).sum(-1)
        own = torch.diagonal(per_view[..., : num_views - num_cond], dim1=2, dim2=4).mean().item()
        entropy = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1).mean().item() / math.log(length)
        records.append(LayerFlow(cond_mass, num_cond / num_views, own, entropy))
        return original(q, k, v, heads, backend, bias)

    attention_module.attend = attend
    try:
        yield records
    finally:
        attention_module.attend = original


def _seeded_noise(x0: Tensor, seed: int) -> Tensor:
    return torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)


def noisy_targets(model: MVDPPModel, x0: Tensor, t: int, seed: int) -> tuple[Tensor, Tensor]:
    """x_t of latents (1, v, c, h, w) at timestep t with seeded noise, and the timestep tensor."""
    tt = torch.full((1,), t, dtype=torch.long)
    return model.schedule.q_sample(x0, tt, _seeded_noise(x0, seed)), tt


def per_view_x0_error(model: MVDPPModel, x0: Tensor, cond: Condition, t: Tensor, seed: int) -> Tensor:
    """MSE of the predicted x0 per view (v,) of latents x0 (1, v, c, h, w) noised with seeded
    noise at timesteps t: (1,) for all views, or (1, v) for one per view."""
    noisy = model.schedule.q_sample(x0, t, _seeded_noise(x0, seed))
    out = model.predict(noisy, t.float(), cond, model.empty_latent(1))
    return (model.schedule.predict_x0(out, noisy, t) - x0).pow(2).mean(dim=(0, 2, 3, 4))


@torch.no_grad()
def target_x0_error(model: MVDPPModel, x0: Tensor, cond: Condition, t: int, seed: int = 0) -> float:
    """MSE of the predicted x0 of the 32 target views (latents x0 (1, 32 + n, c, h, w))."""
    errors = per_view_x0_error(model, x0, cond, torch.full((1,), t, dtype=torch.long), seed)
    return errors[:NUM_TARGET_VIEWS].mean().item()


@torch.no_grad()
def object_latents(
    model: MVDPPModel, target_rgb: Tensor, target_mask: Tensor, cond_rgb: Tensor, cond_mask: Tensor
) -> tuple[Tensor, Condition]:
    """Mean latents (1, 32 + n, 4, h, w) of all views and the condition of an object's views."""
    rgb, mask = torch.cat([target_rgb, cond_rgb]), torch.cat([target_mask, cond_mask])
    x0 = model.vae.encode(rgb, mask)[None]
    return x0, model.encode_condition(cond_rgb, cond_mask)


@torch.no_grad()
def condition_share(model: MVDPPModel, objects: list[tuple[Tensor, Condition]], t: int) -> dict[str, float]:
    """x0 error of targets with own vs another object's condition at timestep t (objects: (x0, cond))."""
    own, other = [], []
    for i, (x0, cond) in enumerate(objects):
        own.append(target_x0_error(model, x0, cond, t, seed=i))
        other.append(target_x0_error(model, x0, objects[(i + 1) % len(objects)][1], t, seed=i))
    err_own, err_other = sum(own) / len(own), sum(other) / len(other)
    return {"t": t, "x0_err_own": err_own, "x0_err_other": err_other, "share": 1 - err_own / err_other}


SIBLING_PROBE_VIEWS = (10, 12, 14)  # elevation 0, azimuths 90, 180, 270 deg: sides and back


@torch.no_grad()
def sibling_share(
    model: MVDPPModel, objects: list[tuple[Tensor, Condition]], t_high: int, t_low: int,
    views: tuple[int, ...] = SIBLING_PROBE_VIEWS, null: bool = False,
) -> dict[str, float]:
    """x0 error of each probe view at ``t_high`` with all other views at ``t_low`` vs at
    ``t_high`` (objects: (x0, cond); the same noise in both), summed over objects and views.
    ``null``: under the null condition (guidance's unconditional branch), where the object is
    known only from the other views (the condition views among them): can the model read them
    when it must?"""
    low, high = 0.0, 0.0
    for i, (x0, cond) in enumerate(objects):
        cond = model.null_condition(cond, model.empty_latent(1)) if null else cond
        joint = per_view_x0_error(model, x0, cond, torch.full(x0.shape[:2], t_high), seed=i)  # one pass
        for k in views:
            tt = torch.full(x0.shape[:2], t_low)
            tt[:, k] = t_high
            low += per_view_x0_error(model, x0, cond, tt, seed=i)[k].item()
            high += joint[k].item()
    n = len(objects) * len(views)
    return {"t_high": t_high, "t_low": t_low, "null": null, "x0_err_others_low": low / n,
            "x0_err_others_high": high / n, "share": 1 - low / high}


@torch.no_grad()
def attention_flow(model: MVDPPModel, objects: list[tuple[Tensor, Condition]], t: int) -> list[dict[str, float]]:
    """Per global attention layer, ``LayerFlow`` averaged over the objects at timestep t."""
    per_layer: list[list[LayerFlow]] = []
    for i, (x0, cond) in enumerate(objects):
        noisy, tt = noisy_targets(model, x0, t, seed=i)
        with recording_attention(x0.shape[1], cond.num_views) as records:
            model.predict(noisy, tt.float(), cond, model.empty_latent(1))
        per_layer = per_layer or [[] for _ in records]
        for slot, record in zip(per_layer, records, strict=True):
            slot.append(record)
    return [
        {field: sum(getattr(r, field) for r in rows) / len(rows) for field in LayerFlow.__dataclass_fields__}
        for rows in per_layer
    ]


def information_flow(
    model: MVDPPModel, objects: list[tuple[Tensor, Condition]], sibling_lows: tuple[int, ...] = (300, 600)
) -> dict:
    """The flow measures above on these objects ((x0, cond) of ``object_latents``): the condition
    share at t = 900 and 500, the sibling share at t = 900 with the others at each of
    ``sibling_lows``, with the condition and under the null condition, and the attention flow at
    t = 900."""
    return {"condition_share": [condition_share(model, objects, t) for t in (900, 500)],
            "sibling_share": [sibling_share(model, objects, 900, t, null=null) for null in (False, True)
                              for t in sibling_lows],
            "attention_t900": attention_flow(model, objects, 900)}


@functools.lru_cache(maxsize=4)
def _rig_voxel_pixels(resolution: int, size: int) -> Tensor:
    """For each rig view and voxel centre of a [-0.5, 0.5]^3 grid of ``resolution``^3, the flat
    index (view * size^2 + row * size + column) of the pixel it falls in, or 32 * size^2 (one
    past the last pixel) when it falls outside the frame (v, N); the same for every set of
    masks, so computed once."""
    axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution - 0.5
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # N 3
    uv, _ = project(grid, rig_c2w(torch.float32), intrinsics(size))  # v N 2
    px = uv.floor().long()
    valid = ((px >= 0) & (px < size)).all(-1)
    flat = torch.arange(NUM_TARGET_VIEWS)[:, None] * size * size + px[..., 1] * size + px[..., 0]
    return torch.where(valid, flat, NUM_TARGET_VIEWS * size * size)


def hull_masks(masks: Tensor, resolution: int = 96, max_dissent: int = 0) -> Tensor:
    """The 32 rig views (32, H, W) bool of the visual hull of 32 rig masks (32, H, W) in [0, 1].

    The hull keeps the voxels of a [-0.5, 0.5]^3 grid of ``resolution``^3 that at most
    ``max_dissent`` views place outside their mask (threshold 0.5; a view the voxel projects
    outside of counts as outside): 0 is the exact visual hull, a few lets every voxel ignore
    that many views (a consensus of masks that disagree). Its projection is rendered per view
    by splatting voxel centres.
    """
    size = masks.shape[-1]
    pixel = _rig_voxel_pixels(resolution, size)  # v N; one past the last pixel = outside the frame
    inside = torch.cat([(masks > 0.5).reshape(-1), torch.zeros(1, dtype=torch.bool)])  # the extra pixel: outside
    dissent = (~inside[pixel]).sum(0)  # N: the views that place each voxel outside
    out = torch.zeros(NUM_TARGET_VIEWS * size * size + 1, dtype=torch.bool)
    out[pixel[:, dissent <= max_dissent]] = True
    return out[:-1].reshape(NUM_TARGET_VIEWS, size, size)


def foreground_colour(rgb: Tensor, mask: Tensor) -> Tensor:
    """Mean colour (3,) of views (v, 3, H, W) over the pixels where masks (v, 1, H, W) > 0.5."""
    fg = mask > 0.5
    return (rgb * fg).sum(dim=(0, 2, 3)) / fg.sum().clamp(min=1)


def mask_iou(a: Tensor, b: Tensor) -> float:
    """IoU of masks of any shape, the same for both, thresholded at 0.5 and pooled over all pixels
    (views too); 1 where both are empty. Shapes that would broadcast (32, H, W) against (32, 1, H,
    W) are refused: they would pool every view against every other."""
    if a.shape != b.shape:
        raise ValueError(f"mask_iou of masks shaped {tuple(a.shape)} and {tuple(b.shape)}: give both the same shape "
                         "(e.g. drop the channel axis of (v, 1, H, W) masks with [:, 0]).")
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum().item()
    return float((a & b).sum().item() / union) if union else 1.0


def mask_placement(pred: Tensor, true: Tensor) -> dict[str, float]:
    """Where the error of a generated mask (H, W) against the true one lies, both thresholded at
    0.5: ``area_ratio`` (its area over the true one's), ``centroid_offset`` (pixels between the
    centroids) and ``mask_iou_aligned``, the IoU after moving and scaling it about its centroid
    onto the true one's centroid and area: what is left is the shape. NaN where either is empty."""
    import kornia.geometry.transform as kgt  # not at import: kornia is slow to import

    p, t = (pred > 0.5).double(), (true > 0.5).double()
    if not p.any() or not t.any():
        return {"area_ratio": math.nan, "centroid_offset": math.nan, "mask_iou_aligned": math.nan}
    ys, xs = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in p.shape), indexing="ij")
    (cp, ct) = (torch.stack([(m * xs).sum(), (m * ys).sum()]) / m.sum() for m in (p, t))
    k = float(torch.sqrt(t.sum() / p.sum()))
    shift = ct - k * cp  # pixel x of pred -> k x + shift
    matrix = torch.tensor([[k, 0.0, shift[0]], [0.0, k, shift[1]]], dtype=torch.float64)[None]
    moved = kgt.warp_affine(p[None, None], matrix, dsize=tuple(p.shape), align_corners=True)[0, 0]
    return {"area_ratio": float(p.sum() / t.sum()), "centroid_offset": float((cp - ct).norm()),
            "mask_iou_aligned": mask_iou(moved, t)}


def scaled_about_centre(masks: Tensor, k: float) -> Tensor:
    """Masks (v, H, W) with their content scaled by ``k`` about the image centre, where every rig
    view looks at the object's centre: near what scaling the object by ``k`` in 3D does to them."""
    import kornia.geometry.transform as kgt

    h, w = masks.shape[-2:]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    matrix = torch.tensor([[k, 0.0, (1 - k) * cx], [0.0, k, (1 - k) * cy]], dtype=masks.dtype)
    return kgt.warp_affine(masks[:, None], matrix.expand(len(masks), 2, 3), dsize=(h, w), align_corners=True)[:, 0]


def best_common_scale(pred: Tensor, true: Tensor, scales: list[float]) -> tuple[float, list[float]]:
    """The one scale of ``scales`` that, applied to all of an object's generated masks (v, H, W)
    (``scaled_about_centre``), matches its true masks best: (k, the pooled mask IoU at every scale).
    What is left at k is the error of the shape, not of the object's size."""
    ious = [mask_iou(scaled_about_centre(pred.double(), k), true) for k in scales]
    return scales[int(torch.tensor(ious).argmax())], ious


def per_view_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each view's masks (v, H, W), thresholded at 0.5; 1 where both are empty."""
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum((1, 2))
    return torch.where(union > 0, (a & b).sum((1, 2)) / union.clamp(min=1), 1.0)


def silhouette_consistency(masks: Tensor, resolution: int = 96) -> float:
    """IoU of 32 rig masks (32, H, W) in [0, 1] with the reprojection of their visual hull
    (:func:`hull_masks`, every mask kept), averaged over the views."""
    return float(per_view_iou(masks, hull_masks(masks, resolution)).mean())


@dataclass(frozen=True)
class MeshErrors:
    """The fast mesh of generated views against the true mesh. ``accuracy`` and
    ``completeness`` are the two halves of ``chamfer``: the mean distance from the generated
    surface to the true one (surface drawn where there is none) and from the true surface to
    the generated one (true surface the mesh misses: a part lost, a concavity filled);
    ``volume_ratio`` is the generated volume over the true one. Both surfaces are the ones that
    bound the solids and both volumes are counted in the IoU's cells, so a true mesh of
    overlapping parts counts its union (not its faces inside other parts, nor its overlaps twice)."""

    volume_iou: float = 0.0
    accuracy: float = math.nan
    completeness: float = math.nan
    volume_ratio: float = math.nan

    @property
    def chamfer(self) -> float:
        return (self.accuracy + self.completeness) / 2


def mesh_errors(views: Tensor, masks: Tensor, truth: trimesh.Trimesh, resolution: int = 64) -> MeshErrors:
    """:class:`MeshErrors` of the fast reconstruction of 32 views (32, H, W, 3) on white and
    masks (32, H, W), as ``MultiViewResult.for_reconstruction`` gives them; volume IoU 0 and NaN
    distances when nothing is reconstructed."""
    try:
        mesh = reconstruct(views, masks, method="fast", resolution=resolution).to_trimesh()
    except (ValueError, RuntimeError):
        return MeshErrors()
    if len(mesh.faces) == 0:
        return MeshErrors()
    accuracy, completeness = chamfer_terms(mesh, truth, samples=10_000)
    iou, ratio = volume_overlap(mesh, truth)
    return MeshErrors(iou, accuracy, completeness, ratio)


@torch.no_grad()
def single_view_hull(rgb: Tensor, mask: Tensor, c2w: Tensor, K: Tensor, samples: int = 96) -> tuple[Tensor, Tensor]:
    """One view of an object reprojected into the 32 rig views through its visual hull.

    The hull of a single view is its silhouette extruded along the view's rays, clipped to
    the [-0.5, 0.5]^3 box every object fits in (DESIGN section 3): a 3D object that contains
    the true one and reproduces the view exactly. Each rig pixel marches ``samples`` points
    through the box; the first inside the hull gives the mask, and its colour is the view's
    colour where that point projects (the front colour, seen from behind too).

    rgb (3, S, S) on white, mask (1, S, S), c2w (4, 4) OpenCV and K (3, 3) of the view ->
    images (32, 3, S, S) on white and masks (32, 1, S, S) in {0, 1}.
    """
    size = rgb.shape[-1]
    origins, dirs = pixel_rays(rig_c2w(torch.float64), intrinsics(size), size, size)  # 32 S S 3
    reach = (TARGET_DISTANCE - OBJECT_RADIUS, TARGET_DISTANCE + OBJECT_RADIUS)  # the box's depths on every ray
    depth = torch.linspace(*reach, samples, dtype=torch.float64)
    points = (origins[..., None, :] + dirs[..., None, :] * depth[:, None]).float()  # 32 S S n 3
    uv, z = project(points.reshape(-1, 3), c2w[None].float(), K.float())  # 1 N 2
    to_ndc = (uv[0] / size * 2 - 1).float()  # grid_sample's frame (pixel centres at +0.5)
    occupancy = F.grid_sample(mask[None].float(), to_ndc[None, None], align_corners=False)[0, 0, 0]
    inside = (occupancy > 0.5) & (z[0] > 0) & (points.reshape(-1, 3).abs() <= 0.5).all(-1)
    inside = inside.reshape(points.shape[:-1])  # 32 S S n
    first = inside.float().argmax(-1, keepdim=True)  # the first sample inside, along each ray
    at = to_ndc.reshape(*points.shape[:-1], 2).gather(-2, first[..., None].expand(-1, -1, -1, 1, 2))  # 32 S S 1 2
    colour = F.grid_sample(rgb[None].float(), at.reshape(1, 1, -1, 2), align_corners=False, padding_mode="border")
    colour = rearrange(colour[0, :, 0], "c (v h w) -> v c h w", v=NUM_TARGET_VIEWS, h=size)
    masks = inside.any(-1).float()[:, None]  # 32 1 S S
    return torch.where(masks > 0.5, colour, torch.ones_like(colour)), masks
