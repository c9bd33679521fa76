"""The demo: one or a few photos -> 32 views on the rig -> grid PNG + textured GLB, on the CPU.

    bash scripts/demo.sh                                  # the shipped example, default model
    bash scripts/demo.sh --image my.png --checkpoint models/mvdpp/my.safetensors
    bash scripts/demo.sh --image front.png side.png       # the first photo defines azimuth 0

Each input is an RGBA PNG (alpha = object) or an RGB photo on a plain background (the
background is segmented). Outputs go to ``outputs/demo/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvdpp_core.cameras import MAX_CONDITION_VIEWS  # noqa: E402
from mvdpp_core.checkpoint import load_checkpoint  # noqa: E402
from mvdpp_core.config import preset  # noqa: E402
from mvdpp_core.grid import view_grid  # noqa: E402
from mvdpp_core.inputs import MAX_AVERAGE_SEEDS  # noqa: E402
from mvdpp_core.model import MVDPPModel  # noqa: E402
from mvdpp_core.photos import frame_photos  # noqa: E402
from mvdpp_core.pipeline import generate  # noqa: E402
from mvdpp_core.reconstruction import export_mesh, reconstruct  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "models" / "mvdpp_default.safetensors"
DEFAULT_IMAGE = ROOT / "workflows" / "inputs" / "heldout_004.png"  # a held-out procedural object
# Sampling (sampler, steps, guidance, mirror averaging, seeds averaged, input averaging). The embedded default makes
# each view mostly on its own (its attention keeps the views in agreement, little more), so a long sampler's per-view
# decisions at low noise give 32 shapes that disagree; 2 deterministic steps keep its high-noise
# prediction, which agrees across views: on 50 held-out objects mask IoU 0.68 vs 0.61, silhouette
# consistency 0.77 vs 0.46, mesh volume IoU 0.46 vs 0.29 (docs/embedded_default.md, "Sampling the embedded default").
# That prediction is a noisy estimate of a mean, so averaging it over 2 noise seeds, each with the
# prediction for the mirrored input (generate's average_seeds and mirror_average), brings it closer
# to the answer: +0.64 dB, mask IoU +0.014, silhouette consistency +0.08 on the same objects, for
# four times the time. It reads only its first photo, so with several photos each one in turn is
# put first and the estimates, turned into the first photo's frame, are averaged (generate's
# input_average; docs/embedded_default.md, "More than one input view").
# Other checkpoints: 20 dpmpp_2m steps, no averaging.
EMBEDDED_SAMPLING = ("ddim", 2, 2.0, True, 2, True)
CHECKPOINT_SAMPLING = ("dpmpp_2m", 20, 2.0, False, 1, False)


def load_model(checkpoint: Path | None) -> tuple[MVDPPModel, str]:
    if checkpoint is not None:
        return load_checkpoint(checkpoint), str(checkpoint)
    if DEFAULT_CHECKPOINT.is_file():
        return load_checkpoint(DEFAULT_CHECKPOINT), str(DEFAULT_CHECKPOINT)
    print("NOTE: no embedded default checkpoint in this checkout; running a freshly initialised "
          "tiny model (its views are noise-like: this exercises the pipeline, not quality).")
    torch.manual_seed(0)
    return MVDPPModel(preset("tiny")).eval(), "untrained tiny preset"


def default_sampling(
    checkpoint: Path | None, sampler: str | None = None, steps: int | None = None, cfg: float | None = None,
    mirror: bool | None = None, seeds: int | None = None, inputs: bool | None = None,
) -> tuple[str, int, float, bool, int, bool]:
    """(sampler, steps, cfg, mirror averaging, seeds averaged, input averaging): those given, the rest from
    ``EMBEDDED_SAMPLING`` for the embedded default (no checkpoint, or its file) or
    ``CHECKPOINT_SAMPLING`` for any other checkpoint."""
    embedded = checkpoint is None or checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve()
    base = EMBEDDED_SAMPLING if embedded else CHECKPOINT_SAMPLING
    given = (sampler, steps, cfg, mirror, seeds, inputs)
    return tuple(b if g is None else g for b, g in zip(base, given, strict=True))


def average_seeds_error(flag: str, count: int | None) -> str | None:
    """The message for a count of averaged seeds outside 1..MAX_AVERAGE_SEEDS given to ``flag``
    (None when it is fine or not given); the demo, eval_default and train_default pass it to
    ``parser.error`` before any work."""
    if count is None or 1 <= count <= MAX_AVERAGE_SEEDS:
        return None
    return f"{flag} {count}: give 1 to {MAX_AVERAGE_SEEDS} noise seeds (1 = no averaging)."


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> PNG."""
    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="MVDiffusion++ demo: image -> 32 views -> grid + GLB")
    parser.add_argument("--image", type=Path, nargs="+", default=[DEFAULT_IMAGE],
                        help="RGBA PNGs or photos on a plain background, 1 to 10 views of one object (the first "
                        "defines azimuth 0; the others need no poses)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a .safetensors bundle (default: embedded)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="default: 2 with the embedded default, 20 with --checkpoint")
    parser.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "dpmpp_2m"],
                        help="default: ddim with the embedded default, dpmpp_2m with --checkpoint")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (default 2)")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the views generated from the mirrored input (twice the time; default: "
                        "on with the embedded default, off with --checkpoint)")
    parser.add_argument("--average-seeds", type=int, default=None,
                        help="average the views of this many noise seeds (default: 2 with the embedded default, 1 "
                        "with --checkpoint)")
    parser.add_argument("--input-average", action=argparse.BooleanOptionalAction, default=None,
                        help="with several photos, average the views generated with each photo first, turned into "
                        "the first photo's frame (one generation per photo; default: on with the embedded default, "
                        "off with --checkpoint)")
    parser.add_argument("--mesh-resolution", type=int, default=96)
    args = parser.parse_args(argv)
    if message := average_seeds_error("--average-seeds", args.average_seeds):
        parser.error(message)
    if len(args.image) > MAX_CONDITION_VIEWS:
        parser.error(f"--image: {len(args.image)} photos given; the model takes 1 to {MAX_CONDITION_VIEWS}.")
    for path in args.image:
        if not path.is_file():
            parser.error(f"--image {path}: no such file; give an RGBA PNG or a photo on a plain background.")

    torch.set_grad_enabled(False)
    model, source = load_model(args.checkpoint)
    sampler, steps, cfg, mirror, seeds, inputs = default_sampling(
        args.checkpoint, args.sampler, args.steps, args.cfg, args.mirror, args.average_seeds, args.input_average)
    start = time.perf_counter()
    # Each photo is read upright and framed on its own (their sizes may differ), as the ComfyUI node frames a batch.
    try:
        views = frame_photos(args.image, size=model.config.image_size)
    except ValueError as err:
        parser.error(str(err))
    result = generate(model, views, seed=args.seed, steps=steps, sampler=sampler, guidance=cfg,
                      mirror_average=mirror, average_seeds=seeds, input_average=inputs,
                      callback=lambda i, n, _: print(f"\rsampling {i}/{n}", end="", flush=True))
    print()
    generated = time.perf_counter()
    mesh = reconstruct(*result.for_reconstruction(), method="fast", resolution=args.mesh_resolution)
    meshed = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    grid_path = args.out / "views_grid.png"
    save_png(view_grid(result.on_white()), grid_path)
    glb_path = export_mesh(mesh, args.out / "mesh.glb", format="glb")
    summary = {
        "model": source,
        "input": [str(path) for path in args.image] if len(args.image) > 1 else str(args.image[0]),
        "sampling": {"sampler": sampler, "steps": steps, "cfg": cfg, "mirror_average": mirror,
                     "average_seeds": seeds, "input_average": inputs},
        "grid_png": str(grid_path),
        "mesh_glb": str(glb_path),
        "generate_seconds": round(generated - start, 2),
        "mesh_seconds": round(meshed - generated, 2),
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
