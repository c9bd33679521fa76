"""Set an MVAE's latent scaling factor from data, as Stable Diffusion's 0.18215 was set.

Why: the default checkpoint's MVAE is trained from random weights, so its latents have no
particular scale, while the diffusion schedule assumes unit-variance latents. We encode
training views (posterior mode) and store ``1 / rms(latents)`` as the scaling factor, so the
scaled latents have unit root-mean-square. Only the metadata changes; the weights do not.

  python -m train.procedural.calibrate --mvae runs/mvae/export/mvae.safetensors \
      --data /tmp/mvdpp_default/data/train --out /tmp/mvdpp_default/mvae_calibrated.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from mvdpp_core.checkpoint import load_mvae, read_mvae_config, save_mvae
from mvdpp_core.vae import MaskAwareVAE

from ..data import format as fmt
from ..data.dataset import to_tensors
from ..data.shards import object_folders


@torch.no_grad()
def latent_rms(vae: MaskAwareVAE, folders: list[Path], image_size: int) -> float:
    """Root-mean-square of the unscaled posterior-mode latents of all views of ``folders``."""
    total, count = 0.0, 0
    for folder in folders:
        views = fmt.read_object_folder(folder)
        rgb, mask = to_tensors(views.target_rgba, image_size)  # 32 3 S S, 32 1 S S
        z = vae.encode(rgb, mask) / vae.scaling_factor
        total += float(z.double().pow(2).sum())
        count += z.numel()
    if not count:
        raise ValueError("no views were encoded; give a --data folder with complete object folders.")
    return (total / count) ** 0.5


def calibrate(mvae_path: Path, data: Path, out: Path, num_objects: int = 32) -> float:
    """Write ``out``: the MVAE of ``mvae_path`` with scaling factor 1 / rms; returns the factor."""
    vae = load_mvae(mvae_path).eval()
    folders = object_folders(data)[:num_objects]
    factor = 1.0 / latent_rms(vae, folders, vae.config.sample_size)
    calibrated = MaskAwareVAE(dataclasses.replace(vae.config, scaling_factor=factor), vae=vae.vae)
    save_mvae(calibrated, out)
    return factor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Set an MVAE's latent scaling factor to 1 / rms of its latents.")
    p.add_argument("--mvae", type=Path, required=True, help="train_mvae.py export (.safetensors)")
    p.add_argument("--data", type=Path, required=True, help="folder of rendered object folders")
    p.add_argument("--out", type=Path, required=True, help="calibrated MVAE file to write")
    p.add_argument("--objects", type=int, default=32, help="objects to encode")
    args = p.parse_args(argv)
    try:  # the inputs, checked before any encoding
        read_mvae_config(args.mvae)
        if not object_folders(args.data):
            p.error(f"--data {args.data}: holds no object folders; render objects there first.")
    except ValueError as err:
        p.error(str(err))
    factor = calibrate(args.mvae, args.data, args.out, args.objects)
    print(f"scaling_factor = {factor:.5f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
