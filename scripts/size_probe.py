"""Is a checkpoint's mask error the size of the object it draws, or its shape?

For each checkpoint, on held-out objects (1 input view, ``cond_00``):

* ``generated``: one estimate of the 32 views (default 2 ddim steps at cfg 2, no averaging).
  Their mask IoU, their area over the true area, and the one scale about the image centre
  (``train.diagnostics.best_common_scale``: near a 3D scaling of the object) that matches them
  best, chosen with the answer. Over the objects: the mask IoU at each object's best scale
  (what a perfect size would add), the best single scale for all objects (a bias in size), and
  how each object's best scale follows the input's camera distance (which the model is not
  told; training's condition views lie 1.5-2.2 from the object, the rig's 1.5). A model blind
  to distance, assuming the mean distance d, would give a slope of 1 / d per unit of distance;
  one that reads distance perfectly, 0.
* ``round_trip``: the MVAE's encode-decode of the true views, mask IoU and area ratio at mask
  thresholds 0.3-0.7 (a decoder that draws masks smaller or larger scores best off 0.5).
* ``mean_latent``: the mean of two objects' latents decoded, its mask's area over the two
  masks' mean area: how the decoder draws a latent that hedges between shapes, as the UNet's
  estimate of a view does.

  python scripts/size_probe.py --heldout /tmp/mvdpp_default/data/heldout_straight --count 50 \\
      --checkpoint models/mvdpp_default.safetensors --checkpoint /tmp/step5.safetensors --out size.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvdpp_core.checkpoint import load_checkpoint  # noqa: E402
from mvdpp_core.condition import ConditionViews  # noqa: E402
from mvdpp_core.model import MVDPPModel  # noqa: E402
from mvdpp_core.pipeline import generate  # noqa: E402
from mvdpp_core.sampling_defaults import checkpoint_flags_error  # noqa: E402
from train.data import format as fmt  # noqa: E402
from train.data.dataset import to_tensors  # noqa: E402
from train.diagnostics import best_common_scale, mask_iou  # noqa: E402
from train.procedural.objects import Split  # noqa: E402
from train.procedural.render import folder_name, write_object  # noqa: E402

SCALES = [round(0.70 + 0.02 * i, 2) for i in range(31)]  # 0.70 .. 1.30
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def held_out(heldout: Path, index: int) -> tuple[fmt.ObjectViews, float]:
    """An object's views (rendered here if missing) and its first condition view's distance."""
    folder = heldout / folder_name(Split.HELDOUT, index)
    if not fmt.is_complete(folder):
        write_object(heldout, Split.HELDOUT, index, 64)
    cameras = json.loads((folder / "cameras.json").read_text())
    return fmt.read_object_folder(folder, cond_ids=[0]), float(cameras["conditions"][0]["distance"])


def generated_sizes(model: MVDPPModel, objects: list[tuple[fmt.ObjectViews, float]], sampler: str, steps: int,
                    guidance: float) -> dict:
    rows = []
    for views, distance in objects:
        rgb, mask = to_tensors(views.target_rgba, model.config.image_size)
        cond = ConditionViews.framed(*to_tensors(views.cond_rgba, model.config.image_size))
        pred = generate(model, cond, seed=0, steps=steps, sampler=sampler, guidance=guidance).masks[:, 0]
        k, ious = best_common_scale(pred, mask[:, 0], SCALES)
        rows.append({"distance": distance, "mask_iou": mask_iou(pred, mask[:, 0]), "best_scale": k, "ious": ious,
                     "area_ratio": float((pred > 0.5).sum() / (mask > 0.5).sum())})
    d, k = np.array([r["distance"] for r in rows]), np.array([r["best_scale"] for r in rows])
    curve = np.array([r["ious"] for r in rows]).mean(0)
    return {"objects": len(rows), "mask_iou": float(np.mean([r["mask_iou"] for r in rows])),
            "mask_iou_at_best_scale": float(np.mean([max(r["ious"]) for r in rows])),
            "area_ratio": float(np.mean([r["area_ratio"] for r in rows])),
            "best_scale_mean": float(k.mean()), "best_scale_std": float(k.std()),
            "best_global_scale": SCALES[int(curve.argmax())], "mask_iou_at_best_global_scale": float(curve.max()),
            "scale_per_unit_distance": float(np.polyfit(d, k, 1)[0]) if len(rows) > 2 and np.ptp(d) > 0 else None,
            "distance_blind_slope": float(1 / d.mean()),
            "per_object": [{key: v for key, v in r.items() if key != "ious"} for r in rows]}


@torch.no_grad()
def decoder_sizes(model: MVDPPModel, objects: list[tuple[fmt.ObjectViews, float]]) -> dict:
    views = [to_tensors(v.target_rgba, model.config.image_size) for v, _ in objects]
    latents = [model.vae.encode(rgb, mask) for rgb, mask in views]
    trip = {t: {"area": 0.0, "true": 0.0, "ious": []} for t in THRESHOLDS}
    for z, (_, mask) in zip(latents, views, strict=True):
        decoded = model.vae.decode(z)[1]
        for t, acc in trip.items():
            acc["area"] += float((decoded > t).sum())
            acc["true"] += float((mask > 0.5).sum())
            acc["ious"].append(mask_iou((decoded > t).float(), mask))
    decoded_area = mean_area = 0.0
    for i in range(0, len(views) - 1, 2):
        decoded_area += float((model.vae.decode((latents[i] + latents[i + 1]) / 2)[1] > 0.5).sum())
        mean_area += float(((views[i][1] > 0.5).sum() + (views[i + 1][1] > 0.5).sum()) / 2)
    return {"round_trip": {str(t): {"mask_iou": float(np.mean(a["ious"])), "area_ratio": a["area"] / a["true"]}
                           for t, a in trip.items()},
            "mean_latent_area_ratio": decoded_area / mean_area if mean_area else None}


def _figure(value: float | None) -> str:
    """A figure for the summary line; None where the objects cannot give it (a slope needs 3+
    objects at different distances), written as null in the JSON."""
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Is a checkpoint's mask error its size or its shape?")
    p.add_argument("--checkpoint", type=Path, action="append", help="repeat to compare (default: the embedded one)")
    p.add_argument("--heldout", type=Path, required=True, help="held-out object folders (rendered here if missing)")
    p.add_argument("--count", type=int, default=24, help="the first N held-out objects")
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim", "dpmpp_2m"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.count < 2:
        p.error(f"--count {args.count}: the mean-latent probe pairs objects; give 2 or more.")
    checkpoints = args.checkpoint or [ROOT / "models" / "mvdpp_default.safetensors"]
    for path in checkpoints:
        if message := checkpoint_flags_error(path, None):
            p.error(message)
    objects = [held_out(args.heldout, i) for i in range(args.count)]
    report = {"objects": args.count, "sampling": [args.sampler, args.steps, args.guidance], "checkpoints": {}}
    for path in checkpoints:
        model = load_checkpoint(path)
        entry = {"generated": generated_sizes(model, objects, args.sampler, args.steps, args.guidance),
                 **decoder_sizes(model, objects)}
        report["checkpoints"][str(path)] = entry
        g = entry["generated"]
        best_trip = max(r["mask_iou"] for r in entry["round_trip"].values())
        print(f"[{path.name}] mask IoU {g['mask_iou']:.4f}, at each object's best scale "
              f"{g['mask_iou_at_best_scale']:.4f}; area ratio {g['area_ratio']:.3f}, best global scale "
              f"{g['best_global_scale']:.2f} ({g['mask_iou_at_best_global_scale']:.4f}); best scale per unit of "
              f"input distance {_figure(g['scale_per_unit_distance'])} (blind: {g['distance_blind_slope']:.3f}); round "
              f"trip mask IoU at 0.5 {entry['round_trip']['0.5']['mask_iou']:.4f}, best {best_trip:.4f}; mean "
              f"latent's area ratio {_figure(entry['mean_latent_area_ratio'])}", flush=True)
        args.out.write_text(json.dumps(report, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
