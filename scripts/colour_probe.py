"""Where does an object's colour get lost: in the MVAE, or in the UNet?

For each held-out object (folders as ``eval_default.py`` renders them), the mean foreground
colour under the true masks of:

* the 32 true views;
* their round trip through the checkpoint's MVAE (encode, decode);
* the views generated from the first condition view with the demo's sampling (2 ddim steps,
  cfg 2, averaged over 2 seeds and the mirrored input), under their own masks;
* with ``--fit-steps N``, rig views 8-15 decoded from latents fitted directly to the true
  views (Adam through the decoder, from the encoder's latents): the colour the decoder can
  show at all, whatever latent it is given.

Generated close to the round trip and far from the truth puts the loss in the MVAE; a fitted
latent that still misses the truth puts it in the decoder's weights. Writes JSON.

With ``--mvae FILE`` (an MVAE export or a bundle) only the round trip is measured, through that
MVAE, and summarised as the slope of decoded on true mean colour across the objects per opponent
axis (luminance, red - green, blue - (red + green) / 2; 1 = colour kept, 0 = one colour for all),
round-trip PSNR on white and mask IoU: how a new MVAE keeps colour, before any UNet is trained.

  python scripts/colour_probe.py --heldout /tmp/mvdpp_default/data/heldout_straight \
      --objects 0 1 2 3 4 5 10 11 --fit-steps 300 --out colour.json
  python scripts/colour_probe.py --heldout /tmp/mvdpp_default/data/heldout_straight \
      --objects $(seq 0 49) --mvae runs/mvae/export/mvae.safetensors --out trip.json
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

from mvdpp_core.checkpoint import load_checkpoint, load_mvae  # noqa: E402
from mvdpp_core.condition import ConditionViews  # noqa: E402
from mvdpp_core.pipeline import generate  # noqa: E402
from train.data import format as fmt  # noqa: E402
from train.data.dataset import to_tensors  # noqa: E402
from train.diagnostics import foreground_colour, mask_iou  # noqa: E402
from train.procedural.objects import Split  # noqa: E402
from train.procedural.render import folder_name, write_object  # noqa: E402


def fitted_latent_colour(vae, rgb: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[list[float], float]:
    """Colour and PSNR of the views decoded from latents fitted to them for ``steps`` Adam steps."""
    with torch.no_grad():
        z = vae.encode(rgb, mask)
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        out, out_mask = vae.decode(z)
        loss = ((out - rgb) ** 2).mean() + ((out_mask - mask) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out, _ = vae.decode(z)
    return foreground_colour(out, mask).tolist(), float(-10 * torch.log10(((out - rgb) ** 2).mean()))


OPPONENT = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, -1.0, 0.0], [-0.5, -0.5, 1.0]])  # lum, red-green, blue-yellow


def colour_slopes(true: np.ndarray, decoded: np.ndarray) -> list[float]:
    """Least-squares slope of decoded on true mean colour (objects, 3) across objects, per opponent axis."""
    t, d = true @ OPPONENT.T, decoded @ OPPONENT.T
    t, d = t - t.mean(0), d - d.mean(0)
    return ((t * d).sum(0) / (t * t).sum(0)).tolist()


def round_trip(vae, heldout: Path, objects: list[int]) -> dict:
    """Round trip of each object's 32 true views through ``vae``: colours, PSNR on white, mask IoU."""
    rows = []
    for index in objects:
        rgb, mask = to_tensors(held_out_views(heldout, index).target_rgba, 64)
        with torch.no_grad():
            decoded, decoded_mask = vae.decode(vae.encode(rgb, mask))
        rows.append({"object": index, "true": foreground_colour(rgb, mask).tolist(),
                     "round_trip": foreground_colour(decoded, mask).tolist(),
                     "psnr": float(-10 * torch.log10(((decoded.clamp(0, 1) - rgb) ** 2).mean())),
                     "mask_iou": mask_iou(decoded_mask, mask)})
    true, trip = (np.array([r[k] for r in rows]) for k in ("true", "round_trip"))
    summary = {"objects": len(rows), "colour_slope_lum_rg_by": np.round(colour_slopes(true, trip), 3).tolist(),
               "mae_true_round_trip": round(float(np.abs(true - trip).mean()), 4),
               "psnr": round(float(np.mean([r["psnr"] for r in rows])), 2),
               "mask_iou": round(float(np.mean([r["mask_iou"] for r in rows])), 4)}
    return {"rows": rows, "summary": summary}


def held_out_views(heldout: Path, index: int) -> fmt.ObjectViews:
    folder = heldout / folder_name(Split.HELDOUT, index)
    if not fmt.is_complete(folder):
        write_object(heldout, Split.HELDOUT, index, 64)
    return fmt.read_object_folder(folder, cond_ids=[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Where an object's colour is lost: MVAE round trip vs generated views.")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "mvdpp_default.safetensors")
    p.add_argument("--heldout", type=Path, required=True, help="held-out object folders (rendered here if missing)")
    p.add_argument("--objects", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 10, 11])
    p.add_argument("--fit-steps", type=int, default=0, help="also fit latents of views 8-15 directly (0: skip)")
    p.add_argument("--mvae", type=Path, help="only the round trip, through this MVAE file or bundle's MVAE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mvae:
        result = round_trip(load_mvae(args.mvae).eval(), args.heldout, args.objects)
        print(json.dumps(result["summary"]))
        args.out.write_text(json.dumps({"mvae": str(args.mvae), **result}, indent=1))
        return 0
    model = load_checkpoint(args.checkpoint)
    model.vae.eval().requires_grad_(False)
    rows = []
    for index in args.objects:
        views = held_out_views(args.heldout, index)
        rgb, mask = to_tensors(views.target_rgba, 64)
        cond_rgb, cond_mask = to_tensors(views.cond_rgba, 64)
        with torch.no_grad():
            decoded, _ = model.vae.decode(model.vae.encode(rgb, mask))
        result = generate(model, ConditionViews.framed(cond_rgb, cond_mask), seed=0, steps=2, sampler="ddim",
                          guidance=2.0, mirror_average=True, average_seeds=2)
        row = {"object": index, "true": foreground_colour(rgb, mask).tolist(),
               "round_trip": foreground_colour(decoded, mask).tolist(),
               "generated": foreground_colour(result.images, result.masks).tolist()}
        if args.fit_steps:
            row["fitted_latent"], row["psnr_fitted_latent"] = fitted_latent_colour(
                model.vae, rgb[8:16], mask[8:16], args.fit_steps)
        rows.append(row)
        print(json.dumps({k: np.round(v, 3).tolist() for k, v in row.items()}), flush=True)
    true, trip, gen = (np.array([r[k] for r in rows]) for k in ("true", "round_trip", "generated"))
    summary = {"mae_true_round_trip": float(np.abs(true - trip).mean()),
               "mae_round_trip_generated": float(np.abs(trip - gen).mean()),
               "mae_true_generated": float(np.abs(true - gen).mean())}
    print(json.dumps(summary))
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
