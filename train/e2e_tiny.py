"""End to end at toy scale on a CPU: render -> shards -> MVAE -> UNet stage 1 -> export -> generate.

    python train/e2e_tiny.py --out outputs/e2e_tiny
    MVDPP_BPY_PATH=/opt/bpy python train/e2e_tiny.py --out outputs/e2e_tiny   # render with the bpy wheel

Renders a few procedural box meshes with Blender when bpy (``$MVDPP_BPY_PATH`` prepended to
the path) or a ``blender`` binary is available, else writes the same kind of objects with
the synthetic ray-caster; packs them into webdataset shards; fine-tunes a tiny MVAE and the
tiny UNet (stage 1) a few steps each from the shards; loads the exported bundle with
``load_checkpoint`` and generates the 32 views of a held-out object. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mvdpp_core.checkpoint import load_checkpoint
from mvdpp_core.condition import ConditionViews
from mvdpp_core.pipeline import generate
from train import train_mvae, train_mvdiff
from train.config import MVAETrainConfig, TrainConfig, load_config
from train.data.dataset import first_object, to_tensors
from train.data.shards import object_folders, pack_shards
from train.data.synthetic import random_boxes, write_synthetic_dataset
from train.render.launch import RenderJob, RenderOptions, render_all
from train.viz import rig_grid, save_png

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"
SIZE = 32
OUTPUTS = ("folders", "meshes", "shards", "mvae", "stage1", "generated.png")  # what a run writes in --out


def blender_available() -> str | None:
    """'blender' (binary), 'bpy' (this Python imports bpy with $MVDPP_BPY_PATH) or None."""
    blender = os.environ.get("MVDPP_BLENDER") or shutil.which("blender")
    if blender:
        return blender
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("MVDPP_BPY_PATH"), str(REPO)]))}
    probe = subprocess.run([sys.executable, "-c", "import bpy"], env=env, capture_output=True, timeout=120)
    return "bpy" if probe.returncode == 0 else None


def render_objects(root: Path, count: int, renderer: str) -> str:
    """Write ``count`` object folders under root/folders; returns how."""
    import trimesh

    folders = root / "folders"
    if renderer is None:
        write_synthetic_dataset(folders, count, SIZE, num_cond=4, seed=0)
        return "synthetic ray-caster (no bpy / blender found)"
    meshes = root / "meshes"
    meshes.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(count):
        boxes = random_boxes(torch.Generator().manual_seed(i))
        parts = [trimesh.creation.box(bounds=[b.lo, b.hi]) for b in boxes]
        trimesh.util.concatenate(parts).export(meshes / f"obj_{i:06d}.glb")
        jobs.append(RenderJob(f"obj_{i:06d}", meshes / f"obj_{i:06d}.glb"))
    if renderer == "bpy":
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("MVDPP_BPY_PATH"), str(REPO)]))
    options = RenderOptions(
        out=folders, resolution=SIZE, num_cond=4, samples=4, blender="" if renderer == "bpy" else renderer, threads=2
    )
    counts = render_all(jobs, options, workers=1)
    if counts["failed"]:
        raise RuntimeError(f"{counts['failed']} renders failed; see {folders / '_failures.jsonl'}.")
    return f"blender ({renderer})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "e2e_tiny")
    p.add_argument("--objects", type=int, default=6)
    p.add_argument("--mvae-steps", type=int, default=5)
    p.add_argument("--unet-steps", type=int, default=10)
    args = p.parse_args(argv)
    start = time.time()
    for name in OUTPUTS:  # a rerun starts afresh; anything else in --out is left alone
        path = args.out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    how = render_objects(args.out, args.objects, blender_available())
    t_render = time.time()
    counts = pack_shards(
        object_folders(args.out / "folders"), str(args.out / "shards" / "objects-%06d.tar"), per_shard=2
    )
    shards = str(args.out / "shards" / f"objects-{{000000..{counts['shards'] - 1:06d}}}.tar")
    common = [f"data.shards={shards}", "data.folders=''", "logging.tensorboard=false"]
    mvae_cfg = load_config(
        MVAETrainConfig,
        CONFIGS / "tiny_cpu_mvae.yaml",
        [*common, f"optim.max_steps={args.mvae_steps}", f"runtime.output_dir={args.out / 'mvae'}"],
    )
    train_mvae.train(mvae_cfg)
    mvae_path = args.out / "mvae" / "export" / "mvae.safetensors"
    unet_cfg = load_config(
        TrainConfig,
        CONFIGS / "tiny_cpu_stage1.yaml",
        [
            *common,
            f"optim.max_steps={args.unet_steps}",
            f"init.mvae_path={mvae_path}",
            f"runtime.output_dir={args.out / 'stage1'}",
            f"checkpoint.every={args.unet_steps}",
        ],
    )
    state = train_mvdiff.train(unet_cfg)
    bundle = args.out / "stage1" / "export" / "model.safetensors"
    model = load_checkpoint(bundle)
    views = first_object(folders=str(args.out / "folders"))
    rgb, mask = to_tensors(views.cond_rgba, model.config.image_size)
    result = generate(model, ConditionViews.framed(rgb, mask), seed=0, steps=10, sampler="ddim")
    grid = save_png(rig_grid(result.on_white(), rgb[0]), args.out / "generated.png")
    print(
        json.dumps(
            {
                "renderer": how,
                "objects": args.objects,
                "shards": counts["shards"],
                "unet_final_loss": state.losses[-1],
                "bundle": str(bundle),
                "generated": str(grid),
                "views": list(result.images.shape),
                "render_s": round(t_render - start, 1),
                "wall_s": round(time.time() - start, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
