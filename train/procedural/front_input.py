"""A copy of rendered-object folders whose first condition view is the rig's front view.

  python -m train.procedural.front_input --src /tmp/mvdpp_default/data/train --out /tmp/front/train

In every copied folder, ``cond_00`` (the input, which defines azimuth 0) is rig view 8:
azimuth 0, elevation 0, at the rig's distance, so the input's pose is known exactly instead of
drawn from the condition range (elevation -10..45 deg, distance 1.5..2.2). Training on such a
copy and evaluating on a copy of the held-out split measures how much of what the model
misses comes from the input's unknown elevation and distance. The other condition views are
unchanged. Files are symbolic links to the source (nothing is duplicated) except
``cameras.json``, rewritten for the new first view. Existing complete copies are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data import format as fmt

FRONT_VIEW = 8  # elevation 0, azimuth 0


def front_input_copy(src: Path, out: Path) -> Path:
    """Copy one object folder ``src`` to ``out`` with rig view 8 as its first condition view."""
    doc = fmt.validate_cameras(json.loads((src / fmt.CAMERAS_FILE).read_text()), where=str(src / fmt.CAMERAS_FILE))
    first = doc["conditions"][0]["file"]
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.name in (fmt.CAMERAS_FILE, first) or path.name.startswith("."):
            continue
        link = out / path.name
        if not link.is_symlink():
            link.symlink_to(path.resolve())
    link = out / first
    if not link.is_symlink():
        link.symlink_to((src / doc["targets"][FRONT_VIEW]["file"]).resolve())
    doc["conditions"] = [dict(doc["targets"][FRONT_VIEW], file=first, index=0)] + doc["conditions"][1:]
    return fmt.write_cameras(out, doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Copy object folders with the rig's front view as the first input.")
    p.add_argument("--src", type=Path, required=True, help="folder of object folders (train.procedural.generate)")
    p.add_argument("--out", type=Path, required=True, help="folder that receives the copies")
    args = p.parse_args(argv)
    src, out = args.src.resolve(), args.out.resolve()
    if out == src or src in out.parents:
        raise SystemExit(f"--out {out} lies inside --src {src}; give a folder outside it.")
    folders = [f for f in sorted(src.iterdir()) if fmt.is_complete(f)]
    if not folders:
        raise SystemExit(f"--src {src} holds no complete object folder (cameras.json and its views).")
    for folder in folders:
        if not fmt.is_complete(out / folder.name):
            front_input_copy(folder, out / folder.name)
    print(f"{len(folders)} object folders under {out}, input = rig view {FRONT_VIEW}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
