"""What one view determines: a direct regressor from the input view to the 32 rig views.

The embedded default, sampled with 2 ddim steps and its views averaged over seeds and the
mirrored input, returns close to the *mean* of the views that agree with its input. This
trains a network for nothing but that mean: from the first input view (RGB on white and mask)
straight to the 32 rig views' masks (binary cross-entropy) and views on white (squared error),
with no noise levels and no latents, and every object pass teaching all 32 views. Scored as
``scripts/eval_default.py`` scores a checkpoint (mask IoU pooled over the 32 views at 0.5, view
PSNR on white, both also against the next held-out object's views, silhouette consistency, mask
IoU by azimuth, and the volume IoU and Chamfer distance of the fast-path mesh of the 32 views
against the true mesh), its figures, as the training set, the steps and the network grow, estimate what
a deterministic predictor reaches from one view of this object distribution: the bar against
which the model and the issue's targets can be read (docs/embedded_default.md, "Finding why the model ignored
its input"). Two references come with them: ``prior``, the per-pixel mean of the training views,
one prediction whatever the input (what the object distribution alone gives), and
``mesh_ceiling``, the mesh figures of the true views (what the fast reconstruction allows).
``--input-size`` reads the input view finer than the views predicted (objects rendered at that
size): whether a finer reading of the input helps the learner.
With ``--spaces latent --mvae BUNDLE`` the same network predicts the 32 views' MVAE latents
instead (squared error on the bundle's encodings, decoded for scoring), as the latent diffusion
model must; ``mvae_ceiling`` scores the true views through that MVAE, and image runs also report
their views through it (``heldout_through_mvae``): how much the latent space itself costs.

  python -m train.regression_bar --train D/train --heldout D/heldout --objects 8000 791 \
      --steps 4000 --cache C.npz --out R.json [--widths 32 48] [--save DIR] \
      [--spaces image latent --no-mirror --mvae models/mvdpp_default.safetensors] [--input-size 128]

Prints one JSON line per run and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from safetensors.torch import save_file
from torch import Tensor, nn

from mvdpp_core.cameras import AZIMUTHS_DEG, ELEVATIONS_DEG, NUM_TARGET_VIEWS, mirrored_view_order
from mvdpp_core.checkpoint import load_checkpoint
from mvdpp_core.pipeline import MultiViewResult
from mvdpp_core.reconstruction.metrics import psnr
from mvdpp_core.vae import MaskAwareVAE

from .data import format as fmt
from .data.dataset import to_tensors
from .data.shards import object_folders
from .diagnostics import mask_iou, mesh_errors, per_view_iou, silhouette_consistency


@dataclass(frozen=True)
class ObjectArrays:
    """Objects as uint8 arrays: ``inputs`` (n, 4, S_in, S_in) the first input view (RGB on white and
    mask; S_in = S unless read finer), ``views`` (n, 32, 4, S, S) the 32 rig views (RGB on white and mask)."""

    inputs: Tensor
    views: Tensor

    def __len__(self) -> int:
        return len(self.inputs)

    def first(self, n: int) -> ObjectArrays:
        return ObjectArrays(self.inputs[:n], self.views[:n])

    def half_size_views(self, chunk: int = 256) -> ObjectArrays:
        """The same objects with their views at half size (``half_size``, rounded to uint8): the
        regressor's training targets, computed once rather than at every step."""
        views = torch.cat([(half_size(self.views[i : i + chunk].float())).round().to(torch.uint8)
                           for i in range(0, len(self), chunk)])
        return ObjectArrays(self.inputs, views)


def _as_uint8(rgb: Tensor, mask: Tensor) -> Tensor:
    return (torch.cat([rgb, mask], dim=1) * 255).round().to(torch.uint8)


def first_folders(root: Path, count: int) -> list[Path]:
    """The first ``count`` complete object folders under ``root`` (``shards.object_folders``'
    order)."""
    folders = [f for f in object_folders(root) if fmt.is_complete(f)][:count]
    if len(folders) < count:
        raise ValueError(f"{root} holds {len(folders)} complete object folders, fewer than the {count} asked for; "
                         "render more (train.procedural.generate --count N) or ask for fewer.")
    return folders


def load_objects(folders: list[Path], size: int, cache: Path | None = None,
                 input_size: int | None = None) -> ObjectArrays:
    """Read the folders' first input view at ``input_size`` px (default ``size``) and 32 rig views
    at ``size`` px; with ``cache``, keep them in that .npz (keyed by the folder paths and the
    sizes) and reuse it. Render the folders at the larger size: a smaller render is upsampled."""
    input_size = size if input_size is None else input_size
    sizes = size if input_size == size else [size, input_size]  # the key of earlier caches when equal
    key = hashlib.sha256(json.dumps([sizes, [str(f.resolve()) for f in folders]]).encode()).hexdigest()[:16]
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            if str(stored["key"]) == key:
                return ObjectArrays(torch.from_numpy(stored["inputs"]), torch.from_numpy(stored["views"]))
    inputs = torch.empty(len(folders), 4, input_size, input_size, dtype=torch.uint8)
    views = torch.empty(len(folders), NUM_TARGET_VIEWS, 4, size, size, dtype=torch.uint8)
    for i, folder in enumerate(folders):
        obj = fmt.read_object_folder(folder, cond_ids=[0])
        inputs[i] = _as_uint8(*to_tensors(obj.cond_rgba, input_size))[0]
        views[i] = _as_uint8(*to_tensors(obj.target_rgba, size))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, key=np.array(key), inputs=inputs.numpy(), views=views.numpy())
    return ObjectArrays(inputs, views)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.SiLU())


def stem_doublings(size: int, input_size: int) -> int | None:
    """How many times ``input_size`` doubles ``size`` (0 when equal); None unless it is ``size``
    times a power of 2."""
    doublings = (input_size // size).bit_length() - 1
    return doublings if input_size >= size and input_size == size << doublings else None


class ViewRegressor(nn.Module):
    """Input view (b, 4, S_in, S_in) -> logits of the 32 rig views (b, 32, 4, S/2, S/2): RGB on white
    and mask, at half the views' size S (the full size costs 4x the output layers on a CPU;
    ``resolution_ceiling`` measures what it gives up). A convolutional encoder down to S/16, a
    fully connected bottleneck (every output pixel sees the whole input), a decoder back to S/4
    with the encoder's features there concatenated (the views next to the input keep its
    detail), and a pixel shuffle to S/2. With ``latent_channels`` it outputs the 32 views'
    MVAE latents instead, (b, 32, latent_channels, S/4, S/4), from the same decoder at S/4.

    ``input_size`` (S_in, default S) reads the input finer than the views it predicts, as the
    paper conditions on 512 px and generates 256 px: a stem of stride-2 blocks, one per doubling,
    brings it to S px, and the rest is unchanged (with S_in = S there is no stem, so earlier
    weights load as they were)."""

    def __init__(self, width: int = 32, size: int = 64, bottleneck: int = 1024, latent_channels: int = 0,
                 input_size: int | None = None):
        super().__init__()
        if size % 16:
            raise ValueError(f"size={size} must be a multiple of 16 (the encoder halves it 4 times).")
        input_size = size if input_size is None else input_size
        doublings = stem_doublings(size, input_size)
        if doublings is None:
            raise ValueError(f"input_size={input_size} must be size={size} times a power of 2 (e.g. {size} or "
                             f"{2 * size}): a stem of stride-2 blocks brings the input to the views' size.")
        w = width
        self.size, self.input_size = size, input_size
        self.stem = nn.Sequential(*(_block(4 if i == 0 else w, w, 2) for i in range(doublings)))
        self.enc = nn.ModuleList([_block(w if doublings else 4, w, 2), _block(w, 2 * w, 2),
                                  _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 2)])
        self.low = (4 * w, size // 16)
        flat = 4 * w * (size // 16) ** 2
        self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(flat, bottleneck), nn.SiLU(),
                                        nn.Linear(bottleneck, flat), nn.SiLU())
        self.dec = nn.ModuleList([_block(8 * w, 4 * w), _block(8 * w, 4 * w), _block(6 * w, 4 * w)])
        self.latent_channels = latent_channels
        self.head = nn.Conv2d(4 * w, NUM_TARGET_VIEWS * (latent_channels or 4 * 4), 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"input of {tuple(x.shape[-2:])} px; this regressor reads {self.input_size} px inputs "
                             f"(load_objects(..., input_size={self.input_size}) reads them at that size).")
        skips = []
        h = self.stem(x * 2 - 1)  # b 4 S_in S_in -> b w S S (or the input itself without a stem)
        for block in self.enc:
            h = block(h)
            skips.append(h)  # S/2, S/4, S/8, S/16
        h = self.bottleneck(h).view(-1, self.low[0], self.low[1], self.low[1])
        for block, skip in zip(self.dec, reversed(skips[1:]), strict=True):  # at S/16, S/8, S/4
            h = block(torch.cat([h, skip], dim=1))
            if h.shape[-1] < self.size // 4:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        if self.latent_channels:
            out = self.head(h)  # b 32*C S/4 S/4
            return out.view(x.shape[0], NUM_TARGET_VIEWS, self.latent_channels, *out.shape[-2:])
        out = F.pixel_shuffle(self.head(h), 2)  # b 128 S/2 S/2
        return out.view(x.shape[0], NUM_TARGET_VIEWS, 4, *out.shape[-2:])


def half_size(views: Tensor) -> Tensor:
    """Views (b, v, c, S, S) averaged over 2 x 2 pixels: what the regressor is trained to output."""
    b, v = views.shape[:2]
    return F.avg_pool2d(views.flatten(0, 1), 2).view(b, v, *views.shape[2:3], *(s // 2 for s in views.shape[-2:]))


def full_size(views: Tensor) -> Tensor:
    """Views (b, v, c, S/2, S/2) upsampled (bilinear) to S px: how the regressor's output is scored."""
    b, v = views.shape[:2]
    up = F.interpolate(views.flatten(0, 1), scale_factor=2.0, mode="bilinear", align_corners=False)
    return up.view(b, v, *up.shape[1:]).clamp(0, 1)


def batch_tensors(data: ObjectArrays, index: Tensor, mirror: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Float inputs (b, 4, S, S) and views (b, 32, 4, S, S) in [0, 1] of objects ``index``;
    where ``mirror`` is set, the mirrored object's (input flipped, views in their mirrored
    slots, flipped: ``mirrored_view_order``)."""
    inputs, views = data.inputs[index].float() / 255, data.views[index].float() / 255
    if mirror is not None and bool(mirror.any()):
        order = torch.tensor(mirrored_view_order())
        inputs[mirror] = inputs[mirror].flip(-1)
        views[mirror] = views[mirror][:, order].flip(-1)
    return inputs, views


def regression_loss(logits: Tensor, views: Tensor, rgb_weight: float = 5.0) -> Tensor:
    """Binary cross-entropy of the masks plus ``rgb_weight`` x squared error of the views on white,
    against the true views at the output's (half) size."""
    if logits.shape != views.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and views {tuple(views.shape)} differ; give the views at the "
                         "regressor's output size (ObjectArrays.half_size_views).")
    mask_loss = F.binary_cross_entropy_with_logits(logits[:, :, 3], views[:, :, 3])
    return mask_loss + rgb_weight * (torch.sigmoid(logits[:, :, :3]) - views[:, :, :3]).pow(2).mean()


def train_regressor(model: ViewRegressor, data: ObjectArrays, steps: int, batch_size: int = 32, lr: float = 1e-3,
                    seed: int = 0, mirror: bool = True, log_every: int = 0,
                    latents: Tensor | None = None) -> list[float]:
    """AdamW with the LR along a cosine to 0; batches of objects drawn at random (half of them
    mirrored with ``mirror``). With ``latents`` (n, 32, C, S/4, S/4), the objects' true MVAE
    latents (``encode_views(vae, data.views)``), a latent regressor learns them by squared error instead.
    Returns the loss of every step."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1.")
    if latents is not None and mirror:
        raise ValueError("mirror=True with latents: a flipped latent is not the latent of the flipped view; "
                         "train latent regressors with mirror=False.")
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    targets = data.half_size_views() if latents is None else None
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        index = torch.randint(len(data), (batch_size,), generator=g)
        flips = torch.rand(batch_size, generator=g) < 0.5 if mirror else None
        if latents is None:
            inputs, views = batch_tensors(targets, index, flips)
            loss = regression_loss(model(inputs), views)
        else:
            loss = F.mse_loss(model(data.inputs[index].float() / 255), latents[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    model.eval()
    return losses


@torch.no_grad()
def predict(model: ViewRegressor, inputs: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Views on white (n, 32, 3, S, S) and mask probabilities (n, 32, 1, S, S) for float inputs."""
    outs = [full_size(torch.sigmoid(model(inputs[i : i + batch_size]))) for i in range(0, len(inputs), batch_size)]
    out = torch.cat(outs)
    return out[:, :, :3], out[:, :, 3:]


@torch.no_grad()
def encode_views(vae: MaskAwareVAE, views: Tensor, chunk: int = 8) -> Tensor:
    """The MVAE latents (posterior mode, scaled) of objects' 32 views, uint8 (n, 32, 4, S, S) as in
    ``ObjectArrays.views``: (n, 32, C, h, w)."""
    out = []
    for i in range(0, len(views), chunk):
        views_i = views[i : i + chunk].flatten(0, 1).float() / 255
        z = vae.encode(views_i[:, :3], views_i[:, 3:])
        out.append(z.view(-1, NUM_TARGET_VIEWS, *z.shape[1:]))
    return torch.cat(out)


@torch.no_grad()
def decode_views(vae: MaskAwareVAE, latents: Tensor, chunk: int = 8) -> tuple[Tensor, Tensor]:
    """Views on white (n, 32, 3, S, S) and masks (n, 32, 1, S, S) decoded from latents (n, 32, C, h, w)."""
    rgb, masks = [], []
    for i in range(0, len(latents), chunk):
        r, m = vae.decode(latents[i : i + chunk].flatten(0, 1))
        rgb.append(r.view(-1, NUM_TARGET_VIEWS, *r.shape[1:]))
        masks.append(m.view(-1, NUM_TARGET_VIEWS, *m.shape[1:]))
    return torch.cat(rgb), torch.cat(masks)


def through_mvae(vae: MaskAwareVAE, rgb: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Views (n, 32, 3 | 1, S, S) encoded and decoded by the MVAE: what of them its latents keep."""
    views = (torch.cat([rgb, masks], dim=2) * 255).round().to(torch.uint8)
    return decode_views(vae, encode_views(vae, views))


@torch.no_grad()
def predict_latents(model: ViewRegressor, vae: MaskAwareVAE, inputs: Tensor,
                    batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """A latent regressor's views, decoded by the MVAE: on white (n, 32, 3, S, S) and masks (n, 32, 1, S, S)."""
    latents = torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    return decode_views(vae, latents)


def score(rgb: Tensor, masks: Tensor, data: ObjectArrays, silhouette: bool = True) -> dict[str, float]:
    """Mean over objects of eval_default's figures: view PSNR on white and mask IoU (pooled over the
    32 views, at 0.5) against the object's own true views and against the next object's
    (``*_other``), silhouette consistency of the predicted masks, and the mask IoU of each rig
    view averaged over the objects and then over each azimuth (``mask_iou_by_azimuth``, azimuth 0
    the input's, as eval_default's ``mask_iou_by_view``)."""
    _, truth = batch_tensors(data, torch.arange(len(data)))
    rows, by_view = [], []
    for i in range(len(data)):
        j = (i + 1) % len(data)
        hwc = rgb[i].permute(0, 2, 3, 1)
        row = [psnr(hwc, truth[i, :, :3].permute(0, 2, 3, 1)), mask_iou(masks[i, :, 0], truth[i, :, 3]),
               psnr(hwc, truth[j, :, :3].permute(0, 2, 3, 1)), mask_iou(masks[i, :, 0], truth[j, :, 3])]
        if silhouette:
            row.append(silhouette_consistency(masks[i, :, 0]))
        rows.append(row)
        by_view.append(per_view_iou(masks[i, :, 0], truth[i, :, 3]))
    names = ("psnr", "mask_iou", "psnr_other", "mask_iou_other", "silhouette")[: len(rows[0])]
    means = np.mean(np.array(rows, dtype=np.float64), axis=0)
    out = {name: round(float(v), 4) for name, v in zip(names, means, strict=True)}
    grid = torch.stack(by_view).double().mean(0).view(len(ELEVATIONS_DEG), len(AZIMUTHS_DEG))
    return out | {"mask_iou_by_azimuth": [round(float(v), 4) for v in grid.mean(0)]}


def prior_views(data: ObjectArrays, mirror: bool = True, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """The input-ignoring bar: the per-pixel mean of every training object's 32 views on white
    (3, S, S each) and masks (1, S, S each), and with ``mirror`` of their mirror images too, as the
    regressor trains. One prediction for every input: what the object distribution alone gives."""
    total = torch.zeros(data.views.shape[1:], dtype=torch.float64)
    for i in range(0, len(data), chunk):
        total += data.views[i : i + chunk].double().sum(0)
    mean = (total / (255 * len(data))).float()
    if mirror:
        mean = (mean + mean[torch.tensor(mirrored_view_order())].flip(-1)) / 2
    return mean[:, :3], mean[:, 3:]


def true_meshes(folders: list[Path]) -> list[trimesh.Trimesh]:
    """Each held-out object's ``mesh.ply`` (the held-out split is rendered with it)."""
    missing = [f for f in folders if not (f / "mesh.ply").is_file()]
    if missing:
        raise ValueError(f"held-out object {missing[0]} has no mesh.ply: render the held-out split with "
                         "`python -m train.procedural.generate --split heldout` (it saves meshes), or pass --no-meshes")
    return [trimesh.load(f / "mesh.ply", process=False) for f in folders]


def mesh_scores(rgb: Tensor, masks: Tensor, meshes: list[trimesh.Trimesh], resolution: int = 64) -> dict[str, float]:
    """eval_default's mesh figures: the fast reconstruction of each object's 32 views on white
    (n, 32, 3, S, S) and masks (n, 32, 1, S, S) against its true mesh; mean volume IoU (0 where
    nothing is reconstructed) and mean Chamfer distance over the objects with a mesh."""
    errors = [mesh_errors(*MultiViewResult(rgb[i], masks[i]).for_reconstruction(), mesh, resolution)
              for i, mesh in enumerate(meshes)]
    rows = np.array([(e.volume_iou, e.chamfer) for e in errors], dtype=np.float64)
    finite = rows[np.isfinite(rows[:, 1]), 1]
    return {"volume_iou": round(float(rows[:, 0].mean()), 4),
            "chamfer": round(float(finite.mean()), 4) if len(finite) else math.nan}


def resolution_ceiling(data: ObjectArrays) -> dict[str, float]:
    """The true views at half size, upsampled as the regressor's are, scored against themselves:
    what predicting at S/2 px gives up."""
    _, truth = batch_tensors(data, torch.arange(len(data)))
    coarse = full_size(half_size(truth))
    return score(coarse[:, :, :3], coarse[:, :, 3:], data, silhouette=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train direct regressors from the input view to the 32 rig views and "
                                            "score them on held-out objects.")
    p.add_argument("--train", type=Path, required=True, help="folder of rendered training objects")
    p.add_argument("--heldout", type=Path, required=True, help="folder of rendered held-out objects")
    p.add_argument("--objects", type=int, nargs="+", default=[791], help="training-set sizes (the first N objects)")
    p.add_argument("--widths", type=int, nargs="+", default=[32], help="network widths (channels of the first level)")
    p.add_argument("--spaces", nargs="+", choices=("image", "latent"), default=["image"],
                   help="what the regressor predicts: the views (image) or their MVAE latents (latent, needs --mvae)")
    p.add_argument("--mvae", type=Path, default=None,
                   help="a model bundle (.safetensors) whose MVAE the latent runs use; image runs then also score "
                        "their views encoded and decoded by it (heldout_through_mvae)")
    p.add_argument("--heldout-count", type=int, default=50)
    p.add_argument("--fit-count", type=int, default=50, help="training objects scored for the fit")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=64, help="the views' size in pixels (the regressor predicts S/2)")
    p.add_argument("--input-size", type=int, default=None,
                   help="read the input view at this size instead (--size times a power of 2, e.g. 128 with "
                        "--size 64: render the objects at 128 px; a stem of stride-2 blocks brings it to --size)")
    p.add_argument("--no-mirror", dest="mirror", action="store_false", help="no mirrored objects in training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cache", type=Path, default=None, help=".npz keeping the decoded training objects")
    p.add_argument("--out", type=Path, required=True, help="JSON file receiving every run's figures")
    p.add_argument("--mesh-resolution", type=int, default=64, help="carving grid of the fast reconstruction")
    p.add_argument("--no-meshes", dest="meshes", action="store_false",
                   help="skip the mesh figures (volume IoU, Chamfer) of the held-out objects")
    p.add_argument("--save", type=Path, default=None,
                   help="folder receiving each run's weights (regressor_w{width}_n{objects}.safetensors; "
                        "_latent and _in{input size} added where they apply)")
    args = p.parse_args(argv)
    for name in ("objects", "widths"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            p.error(f"--{name} {bad[0]}: must be >= 1")
    if "latent" in args.spaces and args.mvae is None:
        p.error("--spaces latent needs --mvae BUNDLE (e.g. models/mvdpp_default.safetensors), whose MVAE "
                "encodes the training views and decodes the predictions")
    if "latent" in args.spaces and args.mirror:
        p.error("--spaces latent needs --no-mirror: a flipped latent is not the latent of the flipped view")
    for name in ("heldout_count", "steps", "batch_size", "size", "mesh_resolution"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.input_size is None:
        args.input_size = args.size
    if stem_doublings(args.size, args.input_size) is None:
        p.error(f"--input-size {args.input_size}: must be --size ({args.size}) times a power of 2, "
                f"e.g. {args.size} or {2 * args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train = load_objects(first_folders(args.train, max(args.objects)), args.size, args.cache, args.input_size)
        held_folders = first_folders(args.heldout, args.heldout_count)
        heldout = load_objects(held_folders, args.size, input_size=args.input_size)
        meshes = true_meshes(held_folders) if args.meshes else None
        vae = load_checkpoint(args.mvae).vae.float().eval() if args.mvae is not None else None
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    held_inputs = heldout.inputs.float() / 255
    _, truth = batch_tensors(heldout, torch.arange(len(heldout)))
    ceiling, runs = resolution_ceiling(heldout), []
    report = {"command": " ".join(sys.argv), "heldout_objects": len(heldout), "resolution_ceiling": ceiling}
    prior = [t.expand(len(heldout), *t.shape) for t in prior_views(train.first(max(args.objects)), args.mirror)]
    report["prior"] = {"objects": max(args.objects), "heldout": score(*prior, heldout)}
    if meshes is not None:  # the mesh figure's ceiling: the fast reconstruction of the true views
        report["mesh_ceiling"] = mesh_scores(truth[:, :, :3], truth[:, :, 3:], meshes, args.mesh_resolution)
        report["prior"]["heldout"] |= mesh_scores(*prior, meshes, args.mesh_resolution)
    if vae is not None:  # what the MVAE's latents keep of the true views
        report["mvae_ceiling"] = score(*through_mvae(vae, truth[:, :, :3], truth[:, :, 3:]), heldout, silhouette=False)
    latents = None  # every training object's latents, encoded once; each run takes its first n
    if "latent" in args.spaces:
        start = time.perf_counter()
        latents = encode_views(vae, train.first(max(args.objects)).views)
        print(f"encoded {len(latents)} objects' views in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for space, width, n in itertools.product(args.spaces, args.widths, args.objects):
        torch.manual_seed(args.seed)
        data, fit = train.first(n), train.first(min(args.fit_count, n))
        if space == "latent":
            model = ViewRegressor(width, args.size, latent_channels=latents.shape[2], input_size=args.input_size)
            views = functools.partial(predict_latents, vae=vae)
        else:
            model, views = ViewRegressor(width, args.size, input_size=args.input_size), predict
        start = time.perf_counter()
        losses = train_regressor(model, data, args.steps, args.batch_size, args.lr, args.seed, args.mirror,
                                 log_every=max(args.steps // 10, 1), latents=latents[:n] if space == "latent" else None)
        train_s = time.perf_counter() - start
        held_rgb, held_masks = views(model, inputs=held_inputs)
        run = {"space": space, "objects": n, "width": width, "input_size": args.input_size,
               "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               "steps": args.steps, "batch_size": args.batch_size, "object_passes_each":
               round(args.steps * args.batch_size / n, 1), "mirror": args.mirror, "lr": args.lr,
               "train_s": round(train_s, 1), "loss_last_100": round(float(np.mean(losses[-100:])), 4),
               "heldout": score(held_rgb, held_masks, heldout),
               "training_objects": score(*views(model, inputs=fit.inputs.float() / 255), fit, silhouette=False)}
        if meshes is not None:
            run["heldout"] |= mesh_scores(held_rgb, held_masks, meshes, args.mesh_resolution)
        if vae is not None and space == "image":
            run["heldout_through_mvae"] = score(*through_mvae(vae, held_rgb, held_masks), heldout)
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            suffix = ("_latent" if space == "latent" else "") + (
                f"_in{args.input_size}" if args.input_size != args.size else "")
            save_file(model.state_dict(), args.save / f"regressor_w{width}_n{n}{suffix}.safetensors")
        print(json.dumps(run), flush=True)
        runs.append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report | {"runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
