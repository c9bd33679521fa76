"""Render a list of objects with a pool of Blender processes, or emit a SLURM array script.

Object lists: CSV with columns ``uid,path`` (header required) or JSON (a list of
``{"uid": ..., "path": ...}`` or a mapping uid -> path). Each object renders into
``<out>/<uid>/``; objects whose folder is already complete are skipped (resume), failures are
logged to ``<out>/_failures.jsonl`` and the run goes on.

Local pool, Blender binary::

    python -m train.render.launch --objects objects.csv --out renders --workers 8 --blender /opt/blender/blender

Local pool, ``bpy`` wheel (a Python 3.11 whose path has bpy, numpy<2 and this repo's deps)::

    PYTHONPATH=/opt/bpy python -m train.render.launch --objects objects.csv --out renders --workers 8

SLURM (one array task per slice of the list; each task runs this launcher on its slice)::

    python -m train.render.launch --objects objects.csv --out renders --slurm render.sbatch --array 100 \
        --blender /opt/blender/blender && sbatch render.sbatch
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..data import format as fmt
from .plan import camera_plan, object_seed, write_plan

SCRIPT = Path(__file__).resolve().parent / "blender_render.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
UID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
PLAN_FILE = ".plan.json"
FAILURES_FILE = "_failures.jsonl"


@dataclass(frozen=True)
class RenderJob:
    uid: str
    path: Path


@dataclass(frozen=True)
class RenderOptions:
    out: Path
    resolution: int = 512
    num_cond: int = 10
    samples: int = 32
    device: str = "cpu"
    seed: int = 0
    blender: str = ""  # Blender binary; empty = run the script with `python` (bpy wheel)
    python: str = sys.executable
    threads: int = 0
    timeout_s: float = 1800.0


def read_object_list(path: str | Path) -> list[RenderJob]:
    """Parse a CSV (uid,path) or JSON object list; uids must be safe folder names."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        rows = list(data.items()) if isinstance(data, dict) else [(d["uid"], d["path"]) for d in data]
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"uid", "path"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: CSV needs a header with columns 'uid' and 'path', got {reader.fieldnames}.")
            rows = [(r["uid"], r["path"]) for r in reader]
    else:
        raise ValueError(f"object list {path} must be .csv (uid,path) or .json.")
    jobs = []
    for uid, obj in rows:
        if not UID_PATTERN.match(str(uid)):
            raise ValueError(f"uid {uid!r} is not a safe folder name; use 1-128 letters, digits, '_' or '-'.")
        obj_path = Path(obj) if Path(obj).is_absolute() else (path.parent / obj)
        jobs.append(RenderJob(str(uid), obj_path))
    return jobs


def render_command(job: RenderJob, plan_path: Path, options: RenderOptions) -> list[str]:
    args = [
        "--object",
        str(job.path),
        "--out",
        str(options.out / job.uid),
        "--plan",
        str(plan_path),
        "--samples",
        str(options.samples),
        "--device",
        options.device,
        "--threads",
        str(options.threads),
    ]
    if options.blender:
        return [options.blender, "-b", "--factory-startup", "-P", str(SCRIPT), "--", *args]
    return [options.python, str(SCRIPT), *args]


def render_one(job: RenderJob, options: RenderOptions) -> dict | None:
    """Render one object; None on success, else a failure record (never raises)."""
    folder = options.out / job.uid
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plan = camera_plan(options.resolution, options.num_cond, object_seed(job.uid, options.seed))
        plan_path = write_plan(folder / PLAN_FILE, plan)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO_ROOT)])),
        }
        proc = subprocess.run(
            render_command(job, plan_path, options), capture_output=True, text=True, timeout=options.timeout_s, env=env
        )
        if proc.returncode == 0 and fmt.is_complete(folder):
            return None
        return {
            "uid": job.uid,
            "path": str(job.path),
            "returncode": proc.returncode,
            "error": (proc.stderr or proc.stdout)[-2000:],
        }
    except Exception as err:  # one broken object must not stop the batch
        return {"uid": job.uid, "path": str(job.path), "returncode": None, "error": f"{type(err).__name__}: {err}"}


def render_all(jobs: list[RenderJob], options: RenderOptions, workers: int = 1) -> dict[str, int]:
    """Render every job not yet complete; returns counts (done, skipped, failed)."""
    todo = [j for j in jobs if not fmt.is_complete(options.out / j.uid)]
    counts = {"done": 0, "skipped": len(jobs) - len(todo), "failed": 0}
    options.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, open(options.out / FAILURES_FILE, "a") as log:
        for job, failure in zip(todo, pool.map(lambda j: render_one(j, options), todo), strict=True):
            if failure is None:
                counts["done"] += 1
                continue
            counts["failed"] += 1
            log.write(json.dumps({**failure, "time": time.time()}) + "\n")
            log.flush()
            print(f"render failed: {job.uid} ({job.path}); see {options.out / FAILURES_FILE}", file=sys.stderr)
    return counts


def slurm_script(objects: Path, options: RenderOptions, array: int, workers: int, partition: str = "") -> str:
    """An sbatch array script: task i renders slice i of ``array`` slices."""
    flags = [
        f"--objects {shlex.quote(str(objects.resolve()))}",
        f"--out {shlex.quote(str(options.out.resolve()))}",
        f"--resolution {options.resolution}",
        f"--num-cond {options.num_cond}",
        f"--samples {options.samples}",
        f"--device {options.device}",
        f"--seed {options.seed}",
        f"--workers {workers}",
        f"--num-slices {array}",
        "--slice $SLURM_ARRAY_TASK_ID",
    ]
    if options.blender:
        flags.append(f"--blender {shlex.quote(options.blender)}")
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=mvdpp-render",
        f"#SBATCH --array=0-{array - 1}",
        f"#SBATCH --cpus-per-task={max(1, workers)}",
        "#SBATCH --output=render-%A_%a.log",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if options.device == "gpu":
        lines.append("#SBATCH --gres=gpu:1")
    lines += [
        f"cd {shlex.quote(str(REPO_ROOT))}",
        f"{shlex.quote(options.python)} -m train.render.launch " + " ".join(flags),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--num-cond", type=int, default=10)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="render threads per Blender process (0 = all)")
    p.add_argument("--workers", type=int, default=1, help="parallel Blender processes")
    p.add_argument("--blender", default="", help="Blender binary (default: this Python with the bpy wheel)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per object")
    p.add_argument("--slice", type=int, default=0, help="render only slice i of --num-slices")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--slurm", type=Path, default=None, help="write an sbatch array script here instead of rendering")
    p.add_argument("--array", type=int, default=1, help="SLURM array size (slices)")
    p.add_argument("--partition", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = RenderOptions(
        out=args.out,
        resolution=args.resolution,
        num_cond=args.num_cond,
        samples=args.samples,
        device=args.device,
        seed=args.seed,
        blender=args.blender,
        threads=args.threads,
        timeout_s=args.timeout,
    )
    if args.slurm is not None:
        args.slurm.write_text(slurm_script(args.objects, options, args.array, args.workers, args.partition))
        print(f"wrote {args.slurm}; submit with: sbatch {args.slurm}")
        return 0
    if not 0 <= args.slice < args.num_slices:
        raise ValueError(f"--slice {args.slice} must be in 0..{args.num_slices - 1}.")
    jobs = read_object_list(args.objects)[args.slice :: args.num_slices]
    counts = render_all(jobs, options, args.workers)
    print(json.dumps(counts))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
