"""Batch generation: many objects -> 32 views + masks, grid and mesh each, on one or many processes.

    python -m mvdpp_core.batch --inputs photos/ --out results/ --checkpoint models/mvdpp/model.safetensors
    accelerate launch --num_processes 8 -m mvdpp_core.batch --inputs objects.csv --out results/   # 8 GPUs
    (multi-node: the same accelerate launch on every node, --out on a shared file system)

Inputs: a folder whose sub-folders are objects (1-10 images each, in name order; the first
is azimuth 0) and whose loose images are one-view objects; or a CSV with columns
``object,image`` (one row per image, in order; relative paths are relative to the CSV).
Images are RGBA PNGs (alpha = object) or photos on a plain background (segmented), each read
upright (EXIF orientation) and framed on its own (``mvdpp_core.photos``).

Outputs per object, in ``<out>/<object>/``: ``view_XX.png`` (RGB on white) and ``mask_XX.png``
for the 32 rig views (i = elevation * 8 + azimuth), ``grid.png``, ``mesh.glb`` and ``done.json``.
An object is written in ``<out>/.<object>.partial/`` and renamed into place when complete, so a
killed run never leaves a half-written object that looks finished; a rerun skips finished
objects. A failing object is recorded in ``<out>/_failed/<object>.json`` (the reason) and the
run goes on; it is retried on the next run. Under ``accelerate launch`` / ``torchrun`` (the
``RANK`` / ``WORLD_SIZE`` variables) rank r takes objects r, r + W, ... of the sorted list, on
GPU ``LOCAL_RANK`` when there is one; no process waits for another. Each object's seed derives
from ``--seed`` and its name only, so the results do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .inputs import average_seeds_error
from .sampling_defaults import (
    EMBEDDED_CHECKPOINT,
    INPUT_AVERAGE_HELP,
    PARTNER_HELP,
    checkpoint_flags_error,
    resolve_partners,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DONE = "done.json"


@dataclass(frozen=True)
class ObjectJob:
    """One object to generate: its name (the output folder) and its 1-10 input images."""

    name: str
    images: tuple[Path, ...]


def list_jobs(inputs: Path) -> list[ObjectJob]:
    """The objects of a folder or CSV, sorted by name (every rank sees the same list)."""
    inputs = Path(inputs)
    if inputs.is_file() and inputs.suffix.lower() == ".csv":
        jobs = _csv_jobs(inputs)
    elif inputs.is_dir():
        jobs = _folder_jobs(inputs)
    else:
        raise ValueError(f"--inputs {inputs} is neither a folder nor a .csv file; give one of them.")
    if not jobs:
        raise ValueError(f"{inputs} holds no input images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    for job in jobs:
        check_name(job.name)
    return sorted(jobs, key=lambda job: job.name)


def _folder_jobs(root: Path) -> list[ObjectJob]:
    jobs = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            images = tuple(p for p in sorted(entry.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
            if images:
                jobs.append(ObjectJob(entry.name, images))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            jobs.append(ObjectJob(entry.stem, (entry,)))
    return jobs


def _csv_jobs(path: Path) -> list[ObjectJob]:
    images: dict[str, list[Path]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"object", "image"} <= set(reader.fieldnames):
            raise ValueError(f"{path} needs a header with columns 'object,image' (got {reader.fieldnames}).")
        for row in reader:
            image = Path(row["image"])
            images.setdefault(row["object"], []).append(image if image.is_absolute() else path.parent / image)
    return [ObjectJob(name, tuple(paths)) for name, paths in images.items()]


def check_name(name: str) -> None:
    """Object names become folder names: refuse anything that could leave ``--out``."""
    if not name or name.startswith(".") or name.startswith("_") or "/" in name or "\\" in name:
        raise ValueError(
            f"object name {name!r} cannot be an output folder name; use letters, digits, '-' and '.' "
            "(not starting with '.' or '_', no slashes)."
        )


def object_seed(seed: int, name: str) -> int:
    """The object's sampling seed: from the run's seed and its name, not its rank or position."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@dataclass(frozen=True)
class BatchSettings:
    seed: int = 0
    steps: int = 20
    sampler: str = "dpmpp_2m"
    guidance: float = 3.0
    mesh_resolution: int = 128
    mirror_average: bool = False
    average_seeds: int = 1
    input_average: bool = False


def save_png(array: Tensor, path: Path) -> None:
    """(3, H, W) or (H, W) in [0, 1] -> 8-bit PNG."""
    from PIL import Image

    data = array.permute(1, 2, 0) if array.ndim == 3 else array
    Image.fromarray((data.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


def generate_object(model, job: ObjectJob, folder: Path, settings: BatchSettings) -> dict:
    """Generate and write one object's files into ``folder``; returns its record."""
    from .grid import view_grid
    from .photos import frame_photos
    from .pipeline import ensemble_members, generate
    from .reconstruction import export_mesh, reconstruct

    views = frame_photos(job.images, size=ensemble_members(model)[0].config.image_size)
    result = generate(
        model, views, seed=object_seed(settings.seed, job.name), steps=settings.steps,
        sampler=settings.sampler, guidance=settings.guidance, mirror_average=settings.mirror_average,
        average_seeds=settings.average_seeds, input_average=settings.input_average,
    )
    on_white = result.on_white()  # 32 3 S S
    for i in range(on_white.shape[0]):
        save_png(on_white[i], folder / f"view_{i:02d}.png")
        save_png(result.masks[i, 0], folder / f"mask_{i:02d}.png")
    save_png(view_grid(on_white), folder / "grid.png")
    mesh = reconstruct(*result.for_reconstruction(), resolution=settings.mesh_resolution)
    export_mesh(mesh, folder / "mesh.glb", format="glb")
    return {"object": job.name, "inputs": [str(p) for p in job.images], "seed": object_seed(settings.seed, job.name)}


def run_job(model, job: ObjectJob, out: Path, settings: BatchSettings, rank: int) -> str:
    """Generate one object atomically: 'done', 'skipped' (finished before) or 'failed'."""
    final, partial, failure = out / job.name, out / f".{job.name}.partial", out / "_failed" / f"{job.name}.json"
    if (final / DONE).is_file():
        return "skipped"
    _log(out, rank, {"object": job.name, "event": "start", "time": time.time()})
    shutil.rmtree(partial, ignore_errors=True)  # a run killed inside this object left it
    partial.mkdir(parents=True)
    try:
        record = generate_object(model, job, partial, settings)
    except Exception as err:  # noqa: BLE001 - one bad object must not stop the others
        failure.parent.mkdir(exist_ok=True)
        reason = f"{type(err).__name__}: {err}"
        failure.write_text(json.dumps({"object": job.name, "reason": reason, "traceback": traceback.format_exc()}))
        shutil.rmtree(partial, ignore_errors=True)
        return "failed"
    (partial / DONE).write_text(json.dumps({**record, "rank": rank, "settings": settings.__dict__}))
    shutil.rmtree(final, ignore_errors=True)  # an unfinished folder from elsewhere: replace it whole
    os.replace(partial, final)
    failure.unlink(missing_ok=True)
    return "done"


def _log(out: Path, rank: int, entry: dict) -> None:
    """Per-rank event log (appended, never shared between processes)."""
    logs = out / "_logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"rank{rank:04d}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from accelerate launch / torchrun variables; (0, 1, 0) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def run_batch(model, jobs: list[ObjectJob], out: Path, settings: BatchSettings, rank: int = 0, world: int = 1) -> dict:
    """Generate this rank's share (objects rank, rank + world, ...); returns counts per outcome."""
    out.mkdir(parents=True, exist_ok=True)
    mine = jobs[rank::world]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for job in _progress(mine, rank):
        counts[run_job(model, job, out, settings, rank)] += 1
    return counts


def _progress(items: list, rank: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with huggingface_hub (diffusers), but do not require it
        return items
    return tqdm(items, desc=f"rank {rank} objects", position=rank, unit="object")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MVDiffusion++ batch generation: objects -> 32 views, masks, grid, GLB.")
    p.add_argument("--inputs", type=Path, required=True, help="folder (sub-folder per object) or CSV object,image")
    p.add_argument("--out", type=Path, required=True, help="output folder (shared by all processes)")
    p.add_argument("--partner", type=Path, nargs="*", default=None, metavar="CHECKPOINT", help=PARTNER_HELP)
    p.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT,
                   help="a .safetensors bundle (default: the embedded one). Unless the sampling flags say "
                   "otherwise, a bundle of the default recipe (the embedded default, its copies, train_default.py "
                   "exports) is sampled with 2 ddim steps at cfg 2 averaged over 2 seeds, the mirrored input and "
                   "each photo put first; any other with 20 dpmpp_2m steps at cfg 3 (mvdpp_core.sampling_defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "dpmpp_2m"])
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the views generated from the mirrored photos (twice the time)")
    p.add_argument("--average-seeds", type=int, default=None,
                   help="average the views of this many noise draws, in antithetic pairs")
    p.add_argument("--input-average", action=argparse.BooleanOptionalAction, default=None,
                   help=INPUT_AVERAGE_HELP)
    p.add_argument("--mesh-resolution", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: bf16 on GPU")
    args = p.parse_args(argv)
    if message := average_seeds_error("--average-seeds", args.average_seeds):
        p.error(message)
    if message := checkpoint_flags_error(args.checkpoint, args.partner):
        p.error(message)
    return args


def batch_settings(args: argparse.Namespace) -> BatchSettings:
    """The run's settings: the sampling flags given, the rest as the checkpoint is sampled by default."""
    from .sampling_defaults import default_sampling

    sampling = default_sampling(
        args.checkpoint, sampler=args.sampler, steps=args.steps, cfg=args.guidance, mirror_average=args.mirror,
        average_seeds=args.average_seeds, input_average=args.input_average)
    return BatchSettings(args.seed, sampling.steps, sampling.sampler, sampling.cfg, args.mesh_resolution,
                         sampling.mirror_average, sampling.average_seeds, sampling.input_average)


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import load_checkpoint

    args = parse_args(argv)
    rank, world, local_rank = process_rank()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    jobs = list_jobs(args.inputs)
    with torch.no_grad():  # scoped: a caller (e.g. a test) keeps its own grad mode
        model = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
        partners = tuple(load_checkpoint(p, device=device, dtype=dtype)
                         for p in resolve_partners(args.checkpoint, args.partner))
        model = (model, *partners) if partners else model  # the embedded default averages with its partner
        settings = batch_settings(args)
        counts = run_batch(model, jobs, args.out, settings, rank, world)
    print(json.dumps({"rank": rank, "world_size": world, "objects": len(jobs[rank::world]), **counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
