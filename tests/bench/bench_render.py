"""Benchmark of the PyTorch rasteriser on the procedural training objects; prints ONE JSON object.

    python tests/bench/bench_render.py                      # 20 objects at 64 and 128 px, 1 thread
    python tests/bench/bench_render.py --objects 50 --sizes 64 --threads 2

Each figure is one core's time to build and render an object as ``train.procedural.generate``
does (32 rig views and 4 condition views, 2x2 supersampling), without writing the PNGs: the
rendering that dominates building a data set (``scripts/train_default.py`` renders with one
process per core, so objects/s per process times processes is the data set's rate). The median
over ``--repeats`` passes over the same objects (training split, indices 40000 on) after one
warm-up object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.procedural.objects import procedural_object  # noqa: E402
from train.procedural.render import render_object  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=20, help="objects per pass")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes in pixels")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="passes per size; the median is reported")
    args = p.parse_args(argv)
    if args.objects < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--objects, --repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    indices = range(40000, 40000 + args.objects)
    faces = [len(procedural_object("train", i)[0].faces) for i in indices]
    report: dict = {"objects": args.objects, "threads": args.threads, "repeats": args.repeats,
                    "mean_faces": round(sum(faces) / len(faces)), "sizes": {}}
    for size in args.sizes:
        render_object("train", indices[0], size)  # warm-up
        passes = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i in indices:
                render_object("train", i, size)
            passes.append((time.perf_counter() - start) / args.objects)
        seconds = statistics.median(passes)
        report["sizes"][str(size)] = {"ms_per_object": round(seconds * 1000, 1),
                                      "objects_per_s": round(1 / seconds, 2),
                                      "passes_ms": [round(s * 1000, 1) for s in passes]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
