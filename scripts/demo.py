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
from mvdpp_core.inputs import average_seeds_error  # noqa: E402
from mvdpp_core.model import MVDPPModel  # noqa: E402
from mvdpp_core.photos import frame_photos  # noqa: E402
from mvdpp_core.pipeline import ensemble_members, generate  # noqa: E402
from mvdpp_core.reconstruction import export_mesh, reconstruct  # noqa: E402
from mvdpp_core.sampling_defaults import (  # noqa: E402
    EMBEDDED_CHECKPOINT,
    INPUT_AVERAGE_HELP,
    PARTNER_HELP,
    checkpoint_flags_error,
    default_sampling,
    resolve_partners,
)

DEFAULT_IMAGE = ROOT / "workflows" / "inputs" / "heldout_004.png"  # a held-out procedural object


def load_model(
    checkpoint: Path | None, partner: list[Path] | None = None
) -> tuple[MVDPPModel | tuple[MVDPPModel, ...], str]:
    """The model, with its partners (``--partner``; for the embedded default, its partner:
    generate averages their masks and keeps the model's colours), and what to call it."""
    if checkpoint is None and EMBEDDED_CHECKPOINT.is_file():
        checkpoint = EMBEDDED_CHECKPOINT
    if checkpoint is not None:
        partners = resolve_partners(checkpoint, partner)
        model = load_checkpoint(checkpoint)
        if not partners:
            return model, str(checkpoint)
        return (model, *map(load_checkpoint, partners)), " + ".join(map(str, (checkpoint, *partners)))
    print("NOTE: no embedded default checkpoint in this checkout; running a freshly initialised "
          "tiny model (its views are noise-like: this exercises the pipeline, not quality).")
    torch.manual_seed(0)
    return MVDPPModel(preset("tiny")).eval(), "untrained tiny preset"


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> PNG."""
    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MVDiffusion++ demo: image -> 32 views -> grid + GLB")
    parser.add_argument("--image", type=Path, nargs="+", default=[DEFAULT_IMAGE],
                        help="RGBA PNGs or photos on a plain background, 1 to 10 views of one object (the first "
                        "defines azimuth 0; the others need no poses)")
    parser.add_argument("--partner", type=Path, nargs="*", default=None, metavar="CHECKPOINT", help=PARTNER_HELP)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a .safetensors bundle (default: embedded). A bundle of the default recipe "
                        "(training_stage 'default': a copy of the embedded default, a train_default.py export) is "
                        "sampled as the embedded default; any other with 20 dpmpp_2m steps at cfg 3, no averaging")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="default: 2 with the embedded default, 20 with any other checkpoint")
    parser.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "dpmpp_2m"],
                        help="default: ddim with the embedded default, dpmpp_2m with any other checkpoint")
    parser.add_argument("--cfg", type=float, default=None,
                        help="classifier-free guidance (default: 2 with the embedded default, 3 with any other "
                        "checkpoint)")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the views generated from the mirrored input (twice the time; default: "
                        "on with the embedded default, off with any other checkpoint)")
    parser.add_argument("--average-seeds", type=int, default=None,
                        help="average the views of this many noise draws, in antithetic pairs (default: 2 with "
                        "the embedded default, 1 with any other checkpoint)")
    parser.add_argument("--input-average", action=argparse.BooleanOptionalAction, default=None,
                        help=INPUT_AVERAGE_HELP)
    parser.add_argument("--mesh-resolution", type=int, default=96)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's flags, each checked before any work (a bad one ends the command with one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if message := average_seeds_error("--average-seeds", args.average_seeds):
        parser.error(message)
    if message := checkpoint_flags_error(args.checkpoint, args.partner):
        parser.error(message)
    if len(args.image) > MAX_CONDITION_VIEWS:
        parser.error(f"--image: {len(args.image)} photos given; the model takes 1 to {MAX_CONDITION_VIEWS}.")
    for path in args.image:
        if not path.is_file():
            parser.error(f"--image {path}: no such file; give an RGBA PNG or a photo on a plain background.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    model, source = load_model(args.checkpoint, args.partner)
    sampler, steps, cfg, mirror, seeds, inputs = default_sampling(
        args.checkpoint, sampler=args.sampler, steps=args.steps, cfg=args.cfg, mirror_average=args.mirror,
        average_seeds=args.average_seeds, input_average=args.input_average)
    start = time.perf_counter()
    # Each photo is read upright and framed on its own (their sizes may differ), as the ComfyUI node frames a batch.
    try:
        views = frame_photos(args.image, size=ensemble_members(model)[0].config.image_size)
    except ValueError as err:
        build_parser().error(str(err))
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
