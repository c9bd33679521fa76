"""Write procedural objects as rendered-object folders (the Blender pipeline's format).

  python -m train.procedural.generate --out /data/procedural/train --split train --count 2000 --size 64
  python -m train.procedural.generate --out /data/procedural/heldout --split heldout --count 64 --size 64
  python -m train.procedural.generate --out /data/procedural/train_upright --split train --count 2000 --upright

Held-out folders also hold the true mesh (``mesh.ply``, normalised world frame) for mesh
metrics. Existing complete folders are kept, so an interrupted run resumes. Prints
objects/second at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..data import format as fmt
from .objects import MAX_PARTS, Split, parse_split, part_count
from .render import NUM_CONDITIONS, check_renderer, folder_name, write_object


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Render procedural objects into object folders.")
    p.add_argument("--out", type=Path, required=True, help="folder that receives one sub-folder per object")
    p.add_argument("--split", choices=[s.value for s in Split], required=True)
    p.add_argument("--count", type=int, required=True, help="number of objects")
    p.add_argument("--start", type=int, default=0, help="first object index")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (64 for the tiny preset)")
    p.add_argument("--num-conditions", type=int, default=NUM_CONDITIONS, help="condition views per object (1..10)")
    p.add_argument("--mesh", action=argparse.BooleanOptionalAction, default=None,
                   help="save mesh.ply (default: for the held-out split only)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--parts", type=int, default=0, choices=range(MAX_PARTS + 1), metavar="K",
                   help="only the objects in the range made of exactly K primitives (0: all; a simpler rung)")
    p.add_argument("--legacy-on-white", action="store_true",
                   help="store colour composited on white, as the renderer did until 2026-12-05 (readers then "
                        "lighten outlines twice): only to reproduce the embedded default's steps 1-5")
    p.add_argument("--upright", action="store_true",
                   help="turn each part about the vertical only (objects with an up, as real ones have; "
                        "same cameras and draws otherwise); keep them in their own folder")
    return p.parse_args(argv)


def generate(out: Path, split: Split, start: int, count: int, size: int, num_conditions: int, save_mesh: bool,
             parts: int = 0, on_white: bool = False, upright: bool = False) -> int:
    """Render objects start..start+count-1 into ``out`` (only those made of exactly ``parts``
    primitives when ``parts`` > 0; ``on_white``: the legacy renderer's colour; ``upright``: parts
    turned about the vertical only); returns how many were rendered now. A complete folder written
    by the other renderer, or holding the other variant, is an error, not kept."""
    if count < 1:
        raise ValueError(f"--count {count}; give at least 1 object.")
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for index in range(start, start + count):
        if parts and part_count(split, index) != parts:
            continue
        folder = out / folder_name(split, index)
        if fmt.is_complete(folder) and (not save_mesh or (folder / "mesh.ply").is_file()):
            check_renderer(folder, on_white, upright)
            continue
        write_object(out, split, index, size, num_conditions, save_mesh, on_white, upright)
        done += 1
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    split = parse_split(args.split)
    save_mesh = split is Split.HELDOUT if args.mesh is None else args.mesh
    t0 = time.perf_counter()
    try:
        done = generate(args.out, split, args.start, args.count, args.size, args.num_conditions, save_mesh,
                        args.parts, args.legacy_on_white, args.upright)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seconds = time.perf_counter() - t0
    print(f"{done} objects rendered in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} objects/s) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
