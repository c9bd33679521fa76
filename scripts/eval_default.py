"""Evaluate a checkpoint on held-out procedural objects: views, masks and meshes vs the truth.

For each held-out object (``train.procedural``, split ``heldout``: never seen in training) and
each number of input views n (default 1, 2, 4: the first n rendered condition views, cond_00
at azimuth 0), generate the 32 rig views and masks and measure:

* view PSNR and SSIM of the generated views composited on white against the true renders;
* mask IoU (masks thresholded at 0.5, pooled over the 32 views), and per rig view, averaged
  over the objects into a 4 x 8 grid (azimuth 0 is the first input's): how accuracy falls
  from the views next to the input to those only 3D inference can fill;
* mesh volume IoU and Chamfer distance of the fast-path reconstruction
  (``mvdpp_core.reconstruction.reconstruct``) against the true mesh (``mesh.ply``);
* whether the output follows its input: PSNR and mask IoU of the same generated views against
  the true renders of *another* held-out object (the next one in the list). A model that
  ignores its input scores the same against both; one that follows it scores higher on its own;
* silhouette consistency of the 32 generated masks (``train.diagnostics``): do they carve
  one 3D object? (true views ~0.99; views that disagree carve to little);
* the mask IoU of their consensus hull (the voxels that at most 2 of the 32 masks place
  outside, reprojected): what fusing the generated masks in 3D would score. Above the raw
  mask IoU where the views err independently; no better where they share one wrong shape;
* the copy test: with the object's true rig view 8 (azimuth 0, elevation 0, the rig's
  distance) as the input, how closely generated view 8 reproduces it.

Sampling defaults to the demo's for the checkpoint (``mvdpp_core.sampling_defaults``: 2 ddim
steps at cfg 2, averaged over an antithetic pair of noise draws and the mirrored input's views,
and with 2 or 4 input views over the estimates with each view first, for the embedded default
and any bundle of its recipe (training_stage 'default'); 20 dpmpp_2m steps at cfg 3 otherwise;
``--mirror`` / ``--no-mirror``, ``--average-seeds N`` and ``--input-average`` /
``--no-input-average`` override the averaging). ``--split train`` measures training
objects instead (the fit), ``--input-copy`` scores the input view repeated in all 32 slots, and
``--hull-baseline`` the input view reprojected through its own visual hull (with its true
camera): the best a model can do that only extrudes the input's silhouette.
``--retrieval-baseline TRAIN`` scores the 32 true masks of the training object whose input mask
is closest to the object's, the mean of the 32 masks of the 16 closest (thresholded at 0.5: an
estimate of the mean of every shape that casts that input silhouette), and the training object
closest in all 32 masks (chosen with the answer): what recalling the training set, rather than
generalising from it, can reach. ``--parts K`` keeps only objects made of K primitives.

The same runs for an untrained model of the same shape (seeded random weights: the floor),
and, with ``--curve``, for the EMA weights of each saved training checkpoint (a learning
curve on a subset). Writes JSON and prints a markdown table.

  python scripts/eval_default.py --heldout /tmp/mvdpp_default/data/heldout --count 50 \
      --out /tmp/mvdpp_default/eval.json --curve /tmp/mvdpp_default/runs/stage1/checkpoints
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import trimesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvdpp_core.cameras import AZIMUTHS_DEG, ELEVATIONS_DEG, resized_intrinsics  # noqa: E402
from mvdpp_core.checkpoint import load_checkpoint  # noqa: E402
from mvdpp_core.common import composite_on_white  # noqa: E402
from mvdpp_core.condition import ConditionViews  # noqa: E402
from mvdpp_core.inputs import average_seeds_error  # noqa: E402
from mvdpp_core.model import MVDPPModel  # noqa: E402
from mvdpp_core.pipeline import MultiViewResult, ensemble_members, generate  # noqa: E402
from mvdpp_core.reconstruction.metrics import psnr, ssim  # noqa: E402
from mvdpp_core.sampling_defaults import (  # noqa: E402
    EMBEDDED_CHECKPOINT,
    EMBEDDED_SAMPLING,
    INPUT_AVERAGE_HELP,
    PARTNER_HELP,
    checkpoint_flags_error,
    default_sampling,
    resolve_partners,
)
from train.data import format as fmt  # noqa: E402
from train.data.dataset import to_tensors  # noqa: E402
from train.data.shards import object_folders  # noqa: E402
from train.diagnostics import (  # noqa: E402
    MeshErrors,
    hull_masks,
    information_flow,
    mask_iou,
    mask_placement,
    mesh_errors,
    object_latents,
    per_view_iou,
    silhouette_consistency,
    single_view_hull,
)
from train.procedural.objects import MAX_PARTS, Split, first_objects  # noqa: E402
from train.procedural.render import check_renderer, folder_name, write_object  # noqa: E402
from train.viz import rig_grid, save_png  # noqa: E402

METRICS = ("psnr", "ssim", "mask_iou", "volume_iou", "chamfer", "psnr_other", "mask_iou_other", "silhouette",
           "mask_iou_consensus")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mask_iou": True, "volume_iou": True, "chamfer": False,
                    "psnr_other": False, "mask_iou_other": False, "silhouette": True, "mask_iou_consensus": True}
CONSENSUS_DISSENT = 2  # views each voxel of the consensus hull may ignore (0.700 vs 0.661 exact, 0.701 at 4)
COPY_VIEW = 8  # azimuth 0, elevation 0: the rig slot an input taken from the rig's own pose fills


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance: float = 2.0
    seed: int = 0
    mesh_resolution: int = 64
    mirror: bool = False  # generate's mirror_average
    average_seeds: int = 1  # generate's average_seeds
    input_average: bool = False  # generate's input_average


@dataclass
class ObjectMetrics:
    psnr: float
    ssim: float
    mask_iou: float
    volume_iou: float
    chamfer: float  # NaN when no mesh could be reconstructed
    psnr_other: float = math.nan  # against another object's true views: the input-ignoring baseline
    mask_iou_other: float = math.nan
    silhouette: float = math.nan  # silhouette consistency of the 32 generated masks
    mask_iou_consensus: float = math.nan  # mask IoU of the reprojected consensus hull of the 32 masks
    mask_iou_views: list[float] = field(default_factory=list)  # per rig view, in rig order
    mask_area_ratio: float = math.nan  # generated over true mask area, pooled over the 32 views
    chamfer_accuracy: float = math.nan  # the Chamfer distance's halves (train.diagnostics.MeshErrors):
    chamfer_completeness: float = math.nan  # generated -> true surface, and true -> generated
    mesh_volume_ratio: float = math.nan  # generated mesh volume over the true one


def heldout_folders(root: Path, count: int, size: int, split: Split = Split.HELDOUT, parts: int = 0,
                    on_white: bool = False, upright: bool = False) -> list[Path]:
    """The first ``count`` object folders of ``split`` under ``root`` (only those with exactly
    ``parts`` primitives when ``parts`` > 0), rendered where missing (``on_white``: by the
    legacy renderer; ``upright``: the upright variant); a folder from the other renderer or
    variant is an error."""
    folders = []
    for index in first_objects(split, count, parts):
        folder = root / folder_name(split, index)
        if fmt.is_complete(folder) and (folder / "mesh.ply").is_file():
            check_renderer(folder, on_white, upright)
        else:
            write_object(root, split, index, size, save_mesh=True, on_white=on_white, upright=upright)
        folders.append(folder)
    return folders


def by_view_grid(rows: list[ObjectMetrics]) -> dict[str, list]:
    """Mean per-view mask IoU over the objects: a grid [elevation row][azimuth column] (rig
    order, azimuth 0 = the first input's), with its column and row means."""
    views = np.array([r.mask_iou_views for r in rows if r.mask_iou_views], dtype=np.float64)
    if not len(views):
        return {}
    grid = views.mean(0).reshape(len(ELEVATIONS_DEG), len(AZIMUTHS_DEG))
    return {"grid": grid.round(4).tolist(), "azimuth_deg": list(AZIMUTHS_DEG), "elevation_deg": list(ELEVATIONS_DEG),
            "by_azimuth": grid.mean(0).round(4).tolist(), "by_elevation": grid.mean(1).round(4).tolist()}


def view_metrics(result: MultiViewResult, rgb: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """PSNR, SSIM (on white) and mask IoU of generated vs true views (32, 3, S, S) / (32, 1, S, S)."""
    pred_hwc, true_hwc = result.on_white().permute(0, 2, 3, 1), rgb.permute(0, 2, 3, 1)  # 32 S S 3
    return psnr(pred_hwc, true_hwc), ssim(pred_hwc, true_hwc), mask_iou(result.masks[:, 0], mask[:, 0])


def evaluate_object(model: MVDPPModel | tuple[MVDPPModel, ...], folder: Path, n_views: int, cfg: SamplingConfig,
                    with_mesh: bool, other: Path | None = None, grid: Path | None = None) -> ObjectMetrics:
    """Metrics of one object (``model``: one, or a tuple whose estimates are averaged, as ``generate``
    takes them); ``other``: a different object whose truth the output is also scored against;
    ``grid``: also write a PNG of the true rig views (first input view in front) above the generated ones."""
    views = fmt.read_object_folder(folder, cond_ids=list(range(n_views)))
    size = ensemble_members(model)[0].config.image_size
    rgb, mask = to_tensors(views.target_rgba, size)
    cond_rgb, cond_mask = to_tensors(views.cond_rgba, size)
    result = generate(model, ConditionViews.framed(cond_rgb, cond_mask), seed=cfg.seed, steps=cfg.steps,
                      sampler=cfg.sampler, guidance=cfg.guidance, mirror_average=cfg.mirror,
                      average_seeds=cfg.average_seeds, input_average=cfg.input_average)
    p, s, m = view_metrics(result, rgb, mask)
    if grid is not None:
        cond = composite_on_white(cond_rgb[0], cond_mask[0])
        truth, generated = rig_grid(composite_on_white(rgb, mask), cond), rig_grid(result.on_white(), cond)
        save_png(np.concatenate([truth, generated]), grid)
    mesh = MeshErrors()
    if with_mesh:
        mesh = mesh_errors(*result.for_reconstruction(), trimesh.load(folder / "mesh.ply", process=False),
                           cfg.mesh_resolution)
    p_other, m_other = math.nan, math.nan
    if other is not None:
        other_rgb, other_mask = to_tensors(fmt.read_object_folder(other, cond_ids=[0]).target_rgba, size)
        p_other, _, m_other = view_metrics(result, other_rgb, other_mask)
    generated = result.masks[:, 0]
    consensus = mask_iou(hull_masks(generated, max_dissent=CONSENSUS_DISSENT).float(), mask[:, 0])
    return ObjectMetrics(p, s, m, mesh.volume_iou, mesh.chamfer, p_other, m_other, silhouette_consistency(generated),
                         consensus, per_view_iou(generated, mask[:, 0]).tolist(),
                         float((generated > 0.5).sum() / (mask > 0.5).sum().clamp(min=1)),
                         mesh.accuracy, mesh.completeness, mesh.volume_ratio)


def copy_test(model: MVDPPModel | tuple[MVDPPModel, ...], folders: list[Path], cfg: SamplingConfig) -> dict[str, float]:
    """Input = the true rig view 8; PSNR (on white) and mask IoU of generated view 8 against it,
    and where the mask's error lies (``train.diagnostics.mask_placement``: area ratio, centroid
    offset in pixels, and the IoU left once size and position are corrected: the shape)."""
    size = ensemble_members(model)[0].config.image_size
    psnrs, ious, placements = [], [], []
    for folder in folders:
        views = fmt.read_object_folder(folder, target_ids=[COPY_VIEW], cond_ids=[0])
        rgb, mask = to_tensors(views.target_rgba, size)  # 1 3 S S: the input and the answer
        result = generate(model, ConditionViews.framed(rgb, mask), seed=cfg.seed, steps=cfg.steps,
                          sampler=cfg.sampler, guidance=cfg.guidance, mirror_average=cfg.mirror,
                          average_seeds=cfg.average_seeds)
        out = MultiViewResult(result.images[COPY_VIEW : COPY_VIEW + 1], result.masks[COPY_VIEW : COPY_VIEW + 1])
        p, _, m = view_metrics(out, rgb, mask)
        psnrs.append(p)
        ious.append(m)
        placements.append(mask_placement(out.masks[0, 0], mask[0, 0]))
    return {"objects": len(folders), "psnr": float(np.mean(psnrs)), "mask_iou": float(np.mean(ious)),
            **{k: float(np.nanmean([row[k] for row in placements])) for k in placements[0]}}


def heldout_flow(model: MVDPPModel, folders: list[Path]) -> dict:
    """``train.diagnostics.information_flow`` on these objects (1 input view): the condition's
    share of the targets' x0 error, the other views' share of a probe view's, and the attention
    mass per global attention layer."""
    size = model.config.image_size
    objects = []
    for folder in folders:
        views = fmt.read_object_folder(folder, cond_ids=[0])
        objects.append(object_latents(model, *to_tensors(views.target_rgba, size), *to_tensors(views.cond_rgba, size)))
    return {"objects": len(folders), **information_flow(model, objects)}


def flow_line(flow: dict) -> str:
    """One line of ``heldout_flow``'s shares."""
    shares = [f"condition share t={r['t']}: {r['share']:.3f}" for r in flow["condition_share"]]
    shares += [f"sibling share t={r['t_high']}/{r['t_low']}{' null' if r['null'] else ''}: {r['share']:.3f}"
               for r in flow["sibling_share"]]
    return "[flow] " + ", ".join(shares)


def input_copy_baseline(folders: list[Path], size: int) -> dict[str, float]:
    """View PSNR and mask IoU of the first input view repeated in all 32 slots, against the
    object's own and another object's true views: what a model that only repeats its input
    scores (no rotation, no 3D)."""
    rows = []
    for i, folder in enumerate(folders):
        cond_rgb, cond_mask = to_tensors(fmt.read_object_folder(folder, cond_ids=[0]).cond_rgba, size)
        copied = MultiViewResult(cond_rgb[:1].expand(32, -1, -1, -1), cond_mask[:1].expand(32, -1, -1, -1))
        own, other = (to_tensors(fmt.read_object_folder(f, cond_ids=[0]).target_rgba, size)
                      for f in (folder, folders[(i + 1) % len(folders)]))
        (p, _, m), (po, _, mo) = view_metrics(copied, *own), view_metrics(copied, *other)
        rows.append((p, m, po, mo))
    mean = np.mean(rows, axis=0)
    return {"objects": len(folders), "psnr": float(mean[0]), "mask_iou": float(mean[1]),
            "psnr_other": float(mean[2]), "mask_iou_other": float(mean[3])}


def hull_baseline(folders: list[Path], size: int) -> dict[str, float]:
    """View PSNR and mask IoU of the first input view reprojected into the 32 slots through its
    own visual hull (its true camera, ``single_view_hull``), against the object's own and
    another object's true views: a baseline that follows its input and agrees in 3D, and knows
    nothing of shapes (every unseen side is as deep as the box the objects fit in)."""
    rows = []
    for i, folder in enumerate(folders):
        views = fmt.read_object_folder(folder, cond_ids=[0])
        cond_rgb, cond_mask = to_tensors(views.cond_rgba, size)
        doc = views.cameras
        K = resized_intrinsics(torch.tensor(doc["K"]), tuple(doc["image_size"]), (size, size))  # [W, H]
        c2w = torch.tensor(doc["conditions"][0]["c2w"])
        hull = MultiViewResult(*single_view_hull(cond_rgb[0], cond_mask[0], c2w, K))
        own, other = to_tensors(views.target_rgba, size), to_tensors(
            fmt.read_object_folder(folders[(i + 1) % len(folders)], cond_ids=[0]).target_rgba, size)
        (p, _, m), (po, _, mo) = view_metrics(hull, *own), view_metrics(hull, *other)
        rows.append((p, m, po, mo, silhouette_consistency(hull.masks[:, 0])))
    mean = np.mean(rows, axis=0)
    return {"objects": len(folders), "psnr": float(mean[0]), "mask_iou": float(mean[1]),
            "psnr_other": float(mean[2]), "mask_iou_other": float(mean[3]), "silhouette": float(mean[4])}


def first_masks(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first input view's mask (S, S) and the 32 true masks (32, S, S) of an object, bool."""
    views = fmt.read_object_folder(folder, cond_ids=[0])
    return to_tensors(views.cond_rgba, size)[1][0, 0] > 0.5, to_tensors(views.target_rgba, size)[1][:, 0] > 0.5


KNN_MEAN = 16  # neighbours averaged by the retrieval baseline's mean masks


def training_folders(train_root: Path) -> list[Path]:
    """The complete object folders of ``train_root`` ('::' joins several); a missing or empty one
    is refused by name."""
    train = [f for f in object_folders(train_root) if fmt.is_complete(f)]
    if not train:
        raise ValueError(f"{train_root} holds no complete object folder; give the training split's folder "
                         "(train.procedural.generate --split train).")
    return train


def retrieval_baseline(folders: list[Path], train_root: Path, size: int) -> dict[str, float]:
    """Mask IoU of a training object's 32 true masks, against the object's own (and another
    object's) true masks: the training object whose input mask has the highest IoU with the
    object's input mask (nearest neighbour: a model that recalls the training set), and the
    best training object for the answer itself (the oracle: the closest shape the training
    set holds). Also the mean of the 32 masks of the ``KNN_MEAN`` nearest training objects,
    thresholded at 0.5 (the silhouette's posterior mean, estimated from the training set:
    the blurred answer a regression on the input's silhouette alone converges to)."""
    train = [first_masks(f, size) for f in training_folders(train_root)]
    objects = [first_masks(f, size) for f in folders]
    # IoU of every (training, evaluated) pair at once: intersections are dot products of 0/1 vectors
    # (exact in float32 below 2^24 pixels), unions |a| + |b| - intersection; one matrix product.
    similar = _iou_matrix(torch.stack([t[0] for t in train]), torch.stack([o[0] for o in objects]))
    nearest = similar.topk(min(KNN_MEAN, len(train)), dim=0).indices  # k m, the nearest first
    best = _iou_matrix(torch.stack([t[1] for t in train]), torch.stack([o[1] for o in objects])).argmax(0)
    rows = []
    for i, (_, truth) in enumerate(objects):
        recalled, closest = train[int(nearest[0, i])][1].float(), train[int(best[i])][1].float()
        blurred = torch.stack([train[int(j)][1] for j in nearest[:, i]]).float().mean(0)  # mask_iou thresholds
        rows.append((mask_iou(recalled, truth.float()), mask_iou(recalled, objects[(i + 1) % len(objects)][1].float()),
                     mask_iou(closest, truth.float()), mask_iou(blurred, truth.float())))
    mean = np.mean(rows, axis=0)
    return {"objects": len(folders), "training_objects": len(train), "mask_iou": float(mean[0]),
            "mask_iou_other": float(mean[1]), "oracle_mask_iou": float(mean[2]),
            "knn_mean_mask_iou": float(mean[3]), "knn": min(KNN_MEAN, len(train))}


def _iou_matrix(a: torch.Tensor, b: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """IoU (n, m) of bool masks a (n, ...) and b (m, ...), each pooled over its trailing dims;
    ``rows`` of ``a`` at a time in float32, so memory stays near that of the bool masks."""
    b = b.flatten(1).float()
    out = []
    for start in range(0, len(a), rows):
        part = a[start : start + rows].flatten(1).float()
        inter = part @ b.T
        out.append(inter / (part.sum(1)[:, None] + b.sum(1)[None] - inter).clamp(min=1))
    return torch.cat(out)


def summarize(rows: list[ObjectMetrics], names: tuple[str, ...] = METRICS) -> dict[str, dict[str, float]]:
    """Mean and standard deviation per metric, over the objects where it is finite (Chamfer:
    those with a mesh)."""
    out = {}
    for name in names:
        values = np.array([getattr(r, name) for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[name] = {"mean": float(finite.mean()) if len(finite) else math.nan,
                     "std": float(finite.std()) if len(finite) else math.nan, "n": int(len(finite))}
    return out


def mesh_error_means(rows: list[ObjectMetrics]) -> dict[str, float]:
    """Means, over the objects with a mesh, of the Chamfer distance's two halves and the
    mesh's volume over the true one."""
    fields = {"accuracy": "chamfer_accuracy", "completeness": "chamfer_completeness",
              "volume_ratio": "mesh_volume_ratio"}
    means = summarize(rows, tuple(fields.values()))
    return {key: means[name]["mean"] for key, name in fields.items()}


def evaluate_model(model: MVDPPModel | tuple[MVDPPModel, ...], folders: list[Path], view_counts: list[int],
                   cfg: SamplingConfig, with_mesh: bool = True, label: str = "", multi_count: int = 0,
                   on_result: Callable[[dict], None] | None = None, grids: Path | None = None) -> dict[str, dict]:
    """Metrics summary per input-view count (keys "1", "2", ...); view counts above 1 use the
    first ``multi_count`` objects (0: all). ``on_result(results)`` after each count. ``grids``:
    a folder for one truth-over-generated PNG per object and view count."""
    results: dict[str, dict] = {}
    for n in view_counts:
        t0 = time.perf_counter()
        subset = folders[:multi_count] if n > 1 and multi_count else folders
        rows = []
        for i, f in enumerate(subset):  # a 50-object run takes 8-20 min on 2 cores: say where it is
            rows.append(evaluate_object(model, f, n, cfg, with_mesh, other=subset[(i + 1) % len(subset)],
                                        grid=grids / f"{label}_{f.name}_{n}view.png" if grids is not None else None))
            print(f"[{label}] {n} view(s): object {i + 1}/{len(subset)} {f.name}, mask IoU {rows[-1].mask_iou:.3f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        results[str(n)] = {"objects": len(rows), "summary": summarize(rows), "mask_iou_by_view": by_view_grid(rows),
                           "mask_area_ratio": float(np.mean([r.mask_area_ratio for r in rows])) if rows
                           else math.nan, "mesh_errors": mesh_error_means(rows),
                           "per_object": [asdict(r) for r in rows], "seconds": round(time.perf_counter() - t0, 1)}
        if on_result is not None:
            on_result(results)
        s = results[str(n)]["summary"]
        print(f"[{label}] {n} view(s): " + ", ".join(f"{k} {s[k]['mean']:.4f}" for k in METRICS)
              + f", mask area ratio {results[str(n)]['mask_area_ratio']:.3f}", flush=True)
        if with_mesh:
            e = results[str(n)]["mesh_errors"]
            print(f"[{label}] {n} view(s): Chamfer accuracy {e['accuracy']:.4f} (generated -> true), completeness "
                  f"{e['completeness']:.4f} (true -> generated), mesh volume ratio {e['volume_ratio']:.3f}", flush=True)
        if by_view := results[str(n)]["mask_iou_by_view"]:  # empty without objects
            print(f"[{label}] {n} view(s): mask IoU by azimuth from the first input "
                  + " / ".join(f"{v:.3f}" for v in by_view["by_azimuth"]), flush=True)
    return results


def untrained_like(model: MVDPPModel, seed: int = 0) -> MVDPPModel:
    """A model of the same architecture with seeded random weights (nothing learned)."""
    torch.manual_seed(seed)
    return MVDPPModel(model.config, with_image_encoder=model.image_encoder is not None).eval()


def with_ema_weights(model: MVDPPModel, checkpoint_dir: Path) -> MVDPPModel:
    """``model`` with the EMA weights (the UNet, and a trained image encoder) of a training
    checkpoint folder (step_*/ema.safetensors)."""
    from safetensors.torch import load_file

    from train.models import model_with_trained_weights

    return model_with_trained_weights(model, load_file(str(checkpoint_dir / "ema.safetensors"))).eval()


def sampling_line(sampling: tuple) -> str:
    """The sampling a run uses, said before it starts: flags, or a checkpoint that is not a bundle of the
    default recipe (a run folder's EMA weights, for one), can give a sampling other than the embedded
    default's, under which a model of that recipe makes views that disagree."""
    sampler, steps, guidance, mirror, seeds, inputs = sampling
    line = (f"[sampling] {sampler}, {steps} steps, cfg {guidance:g}, mirror {'on' if mirror else 'off'}, "
            f"{seeds} seed(s), input averaging {'on' if inputs else 'off'}")
    if tuple(sampling) != EMBEDDED_SAMPLING:
        line += (" (not the embedded default's; to sample a model of its recipe as the embedded default, give "
                 f"{EMBEDDED_FLAGS})")
    return line


def _embedded_flags() -> str:
    sampler, steps, cfg, mirror, seeds, inputs = EMBEDDED_SAMPLING
    return (f"--sampler {sampler} --steps {steps} --guidance {cfg:g} --{'' if mirror else 'no-'}mirror "
            f"--average-seeds {seeds} --{'' if inputs else 'no-'}input-average")


EMBEDDED_FLAGS = _embedded_flags()  # the flags that give any checkpoint the embedded default's sampling


def learning_curve(model: MVDPPModel, root: Path, folders: list[Path], cfg: SamplingConfig,
                   every: int = 1) -> list[dict]:
    """1-view view and mask metrics of the EMA weights of the saved checkpoints whose step is a
    multiple of ``every`` (no meshes)."""
    curve = []
    for ckpt in sorted(p for p in root.glob("step_*") if (p / "ema.safetensors").is_file()):
        step = int(ckpt.name.removeprefix("step_"))
        if step % every:
            continue
        trained = with_ema_weights(model, ckpt)
        rows = [evaluate_object(trained, f, 1, cfg, with_mesh=False, other=folders[(i + 1) % len(folders)])
                for i, f in enumerate(folders)]
        s = summarize(rows)
        keys = ("psnr", "ssim", "mask_iou", "psnr_other", "mask_iou_other", "silhouette", "mask_iou_consensus")
        curve.append({"step": step, **{k: s[k]["mean"] for k in keys}})
        print(f"[curve] step {step}: psnr {s['psnr']['mean']:.3f} mask_iou {s['mask_iou']['mean']:.4f}", flush=True)
    return curve


def matched_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(model, label, entry) rows; the 1-view result is repeated on the first k objects when
    more views ran on k objects only, so the 1 -> 2 -> 4 comparison uses the same objects."""
    rows = []
    for model in ("trained", "untrained"):
        results = report.get(model, {})
        for n, entry in results.items():
            rows.append((model, n, entry))
        subset = {e["objects"] for k, e in results.items() if k != "1"}
        if "1" in results and len(subset) == 1 and subset != {results["1"]["objects"]}:
            k = subset.pop()
            first = [ObjectMetrics(**r) for r in results["1"]["per_object"][:k]]
            matched = (model, f"1 (first {k})", {"objects": k, "summary": summarize(first)})
            rows.insert(len(rows) - len(results) + 1, matched)
    return rows


def markdown_table(report: dict) -> str:
    lines = ["| model | input views | objects | view PSNR (dB) | view SSIM | mask IoU | mesh volume IoU | Chamfer "
             "| PSNR vs another object | mask IoU vs another object | silhouette consistency "
             "| mask IoU of the consensus hull |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, n, entry in matched_rows(report):
        s = {k: entry["summary"].get(k, {"mean": math.nan})["mean"] for k in METRICS}  # older reports lack some
        lines.append(f"| {label} | {n} | {entry['objects']} | " + " | ".join(
            f"{s[k]:.2f}" if k.startswith("psnr") else f"{s[k]:.4f}" for k in METRICS) + " |")
    if report.get("curve"):
        lines += ["", "| training step | view PSNR | PSNR vs another | mask IoU | mask IoU vs another | silhouette |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['step']} | {c['psnr']:.2f} | {c.get('psnr_other', math.nan):.2f} | {c['mask_iou']:.4f} "
                  f"| {c.get('mask_iou_other', math.nan):.4f} | {c.get('silhouette', math.nan):.4f} |"
                  for c in report["curve"]]
    for label, n, entry in matched_rows(report):
        if by_view := entry.get("mask_iou_by_view"):
            az, el = (" / ".join(f"{v:.3f}" for v in by_view[k]) for k in ("by_azimuth", "by_elevation"))
            lines += ["", f"Mask IoU per rig view, {label}, {n} input view(s), mean over the objects: by azimuth "
                          f"from the first input (0, 45, ..., 315 deg) {az}; by elevation (-30, 0, 30, 60 deg) {el}"]
    if report.get("input_copy"):
        c = report["input_copy"]
        lines += ["", f"Input copied into all 32 slots ({c['objects']} objects): PSNR {c['psnr']:.2f} / "
                      f"{c['psnr_other']:.2f} dB, mask IoU {c['mask_iou']:.4f} / {c['mask_iou_other']:.4f} "
                      "(own / another object)"]
    if report.get("hull_baseline"):
        c = report["hull_baseline"]
        lines += ["", f"Input reprojected through its own visual hull ({c['objects']} objects): PSNR {c['psnr']:.2f} / "
                      f"{c['psnr_other']:.2f} dB, mask IoU {c['mask_iou']:.4f} / {c['mask_iou_other']:.4f} "
                      f"(own / another object), silhouette consistency {c['silhouette']:.4f}"]
    if report.get("retrieval_baseline"):
        c = report["retrieval_baseline"]
        lines += ["", f"Nearest training object by input mask ({c['objects']} objects, "
                      f"{c['training_objects']} training objects): mask IoU {c['mask_iou']:.4f} / "
                      f"{c['mask_iou_other']:.4f} (own / another object); the mean of the {c['knn']} nearest: "
                      f"{c['knn_mean_mask_iou']:.4f}; the best training object for the answer: "
                      f"{c['oracle_mask_iou']:.4f}"]
    if report.get("copy_test"):
        c = report["copy_test"]
        placement = (f"; its mask's area {c['area_ratio']:.3f} x the true one's, centroid {c['centroid_offset']:.2f} "
                     f"px off, mask IoU {c['mask_iou_aligned']:.4f} once moved and scaled onto it (the shape)"
                     if "area_ratio" in c else "")  # older reports lack it
        lines += ["", f"Copy test (input = true rig view 8, {c['objects']} objects): view 8 PSNR {c['psnr']:.2f} dB, "
                      f"mask IoU {c['mask_iou']:.4f}{placement}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on held-out procedural objects.")
    p.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    p.add_argument("--partner", type=Path, nargs="*", default=None, metavar="CHECKPOINT", help=PARTNER_HELP)
    p.add_argument("--heldout", type=Path, required=True, help="held-out object folders (rendered here if missing)")
    p.add_argument("--split", choices=[s.value for s in Split], default=Split.HELDOUT.value,
                   help="which objects under --heldout: 'train' measures the fit on training objects (same "
                        "metrics), to tell fitting from generalisation")
    p.add_argument("--legacy-on-white", action="store_true",
                   help="held-out views rendered with colour on white (the renderer until 2026-12-05): only to "
                        "reproduce the evaluations made before it (docs/embedded_default.md says which)")
    p.add_argument("--upright", action="store_true",
                   help="held-out objects whose parts turn about the vertical only (train.procedural.generate "
                        "--upright): for models trained on upright objects; keep them in their own folder")
    p.add_argument("--input-copy", action="store_true",
                   help="also score the input view repeated in all 32 slots (a model that only repeats its input)")
    p.add_argument("--hull-baseline", action="store_true",
                   help="also score the input view reprojected through its own visual hull (its true camera)")
    p.add_argument("--retrieval-baseline", type=Path, default=None, metavar="TRAIN",
                   help="also score recalling the training objects under TRAIN (nearest by input mask, and the oracle)")
    p.add_argument("--count", type=int, default=50, help="held-out objects")
    p.add_argument("--parts", type=int, default=0, choices=range(MAX_PARTS + 1), metavar="K",
                   help="only objects made of exactly this many primitives (0: any; a difficulty rung)")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4], help="input-view counts to evaluate")
    p.add_argument("--sampler", default=None,
                   help="default: the demo's for this checkpoint (mvdpp_core.sampling_defaults)")
    p.add_argument("--steps", type=int, default=None, help="default: the demo's for this checkpoint")
    p.add_argument("--guidance", type=float, default=None, help="default: the demo's for this checkpoint")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the views from the mirrored input (generate's mirror_average); default: the "
                   "demo's for this checkpoint")
    p.add_argument("--average-seeds", type=int, default=None,
                   help="average the views of this many noise draws, in antithetic pairs (generate's average_seeds); "
                   "default: the demo's")
    p.add_argument("--input-average", action=argparse.BooleanOptionalAction, default=None,
                   help=INPUT_AVERAGE_HELP)
    p.add_argument("--per-view-attention", action="store_true",
                   help="restrict every attention layer to its own view (what the outputs owe to information "
                   "crossing views: the model's cross-view path)")
    p.add_argument("--flow-count", type=int, default=0,
                   help="objects for the information-flow measures (train.diagnostics: condition share, sibling "
                   "share, attention mass); 0: skip")
    p.add_argument("--copy-count", type=int, default=16, help="objects for the copy test (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh-resolution", type=int, default=64, help="carving grid of the fast reconstruction")
    p.add_argument("--multi-count", type=int, default=0,
                   help="objects for the view counts above 1 (0: --count); 32-view sampling is slow on a CPU")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained model")
    p.add_argument("--baseline-count", type=int, default=0, help="objects for the untrained model (0: --count)")
    p.add_argument("--curve", type=Path, default=None, help="training checkpoints folder (step_*/ema.safetensors)")
    p.add_argument("--curve-count", type=int, default=8, help="objects per curve point")
    p.add_argument("--curve-every", type=int, default=1, help="only checkpoints whose step is a multiple of this")
    p.add_argument("--out", type=Path, required=True, help="JSON report path")
    p.add_argument("--grids", type=Path, default=None,
                   help="folder for one PNG per object: its true rig views above the generated ones")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", action="store_true", help="only print the markdown table of an existing --out JSON")
    args = p.parse_args(argv)
    if message := average_seeds_error("--average-seeds", args.average_seeds):
        p.error(message)
    if message := checkpoint_flags_error(args.checkpoint, args.partner):
        p.error(message)
    if max(args.views) > 4 or min(args.views) < 1:
        p.error(f"--views {' '.join(map(str, args.views))}: held-out objects hold 4 condition views; give 1 to 4.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    sampler, steps, guidance, mirror, seeds, inputs = default_sampling(  # the demo's unless given
        args.checkpoint, sampler=args.sampler, steps=args.steps, cfg=args.guidance, mirror_average=args.mirror,
        average_seeds=args.average_seeds, input_average=args.input_average)
    cfg = SamplingConfig(sampler, steps, guidance, args.seed, args.mesh_resolution, mirror, seeds, inputs)
    print(sampling_line((sampler, steps, guidance, mirror, seeds, inputs)), flush=True)
    if args.retrieval_baseline is not None:  # refused now, not after the model's evaluation
        try:
            training_folders(args.retrieval_baseline)
        except ValueError as e:
            raise SystemExit(f"error: --retrieval-baseline: {e}") from None
    try:
        folders = heldout_folders(args.heldout, args.count, 64, Split(args.split), args.parts, args.legacy_on_white,
                                  args.upright)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model = load_checkpoint(args.checkpoint)
    partners = resolve_partners(args.checkpoint, args.partner)
    ensemble = (model, *(load_checkpoint(p) for p in partners)) if partners else model  # what generates
    if partners:
        print(f"[ensemble] estimates averaged with {', '.join(str(p) for p in partners)}", flush=True)
    if args.per_view_attention:
        for member in ensemble_members(ensemble):
            member.unet.set_attention_backend("sdpa", global_attention=False)
        print("[attention] every layer restricted to its own view", flush=True)
    report: dict = {"checkpoint": str(args.checkpoint), "partners": [str(p) for p in partners],
                    "split": args.split, "objects": len(folders),
                    "parts": args.parts, "upright": args.upright, "sampling": asdict(cfg),
                    "per_view_attention": args.per_view_attention,
                    "targets_1_view": {"psnr": 20.0, "mask_iou": 0.85, "mask_iou_gap": 0.25, "psnr_gap": 4.0,
                                       "silhouette": 0.85, "volume_iou": 0.60}}
    t0 = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(label: str) -> Callable[[dict], None]:  # partial reports survive an interrupted run
        def write(results: dict) -> None:
            report[label] = results
            report["seconds"] = round(time.perf_counter() - t0, 1)
            args.out.write_text(json.dumps(report, indent=1))
        return write

    if args.input_copy:
        save("input_copy")(input_copy_baseline(folders, model.config.image_size))
    if args.hull_baseline:
        save("hull_baseline")(hull_baseline(folders, model.config.image_size))
    if args.retrieval_baseline is not None:
        save("retrieval_baseline")(retrieval_baseline(folders, args.retrieval_baseline, model.config.image_size))
    if args.flow_count:
        save("flow")(heldout_flow(model, folders[: args.flow_count]))
        print(flow_line(report["flow"]), flush=True)
    evaluate_model(ensemble, folders, args.views, cfg, label="trained", multi_count=args.multi_count,
                   on_result=save("trained"), grids=args.grids)
    if args.copy_count:
        save("copy_test")(copy_test(ensemble, folders[: args.copy_count], cfg))
        print(f"[copy test] {report['copy_test']}", flush=True)
    if not args.no_baseline:
        base = folders[: args.baseline_count or len(folders)]
        evaluate_model(untrained_like(model), base, args.views, cfg, label="untrained",
                       multi_count=min(args.multi_count or len(base), len(base)), on_result=save("untrained"))
    if args.curve is not None:
        save("curve")(learning_curve(model, args.curve, folders[: args.curve_count], cfg, args.curve_every))
    print(markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
