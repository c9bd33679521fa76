"""Benchmark of the reconstruction subsystem; prints ONE JSON object.

    python tests/bench/bench_reconstruction.py            # CPU, ~2-5 min on 2 cores
    python tests/bench/bench_reconstruction.py --quick    # skips the quality path

* ``fast_256``: 32 views at 256 px -> GLB through the fast path on a 256^3 grid (target
  <= 5 s on a 2-core CPU), with vertex colours and with a 1024^2 UV texture.
* ``shapes``: volume IoU / Chamfer per shape for the fast path (128 px, 128^3) and, for
  the bowl, the quality path at its CPU preset (time and gain).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mvdpp_core.cameras import intrinsics, rig_c2w  # noqa: E402
from mvdpp_core.reconstruction import (  # noqa: E402
    SDFConfig,
    chamfer_distance,
    export_mesh,
    reconstruct,
    render_trimesh,
    shapes,
    volume_iou,
)


def render(mesh, size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    start = time.perf_counter()
    out = render_trimesh(mesh, rig_c2w(), intrinsics(size), size, antialias=2)
    return out.rgb, out.alpha, time.perf_counter() - start


def bench_fast_256(tmp: Path) -> dict:
    mesh = shapes.patterned(shapes.sphere(subdivisions=5))
    views, masks, t_render = render(mesh, 256)
    result: dict = {"render_32x256px_s": round(t_render, 2), "mesh_faces_in": len(mesh.faces)}
    for name, kwargs in (("vertex_colors", {}), ("uv_texture_1024", {"texture_size": 1024})):
        start = time.perf_counter()
        rec = reconstruct(views, masks, method="fast", resolution=256, **kwargs)
        path = export_mesh(rec, tmp / f"fast_{name}.glb")
        seconds = time.perf_counter() - start
        tm = rec.to_trimesh()
        result[name] = {
            "seconds_to_glb": round(seconds, 2),
            "faces": len(rec.faces),
            "glb_mb": round(path.stat().st_size / 2**20, 2),
            "iou": round(volume_iou(tm, mesh), 4),
            "chamfer": round(chamfer_distance(tm, mesh), 4),
        }
    return result


def bench_shapes(quality: bool) -> dict:
    builders = {
        "sphere": shapes.sphere,
        "cube": shapes.box,
        "torus": shapes.torus,
        "bowl": lambda: shapes.patterned(shapes.bowl()),
    }
    out: dict = {}
    for name, build in builders.items():
        mesh = build()
        views, masks, _ = render(mesh, 128)
        start = time.perf_counter()
        tm = reconstruct(views, masks, method="fast", resolution=128).to_trimesh()
        out[name] = {
            "fast": {
                "seconds": round(time.perf_counter() - start, 2),
                "iou": round(volume_iou(tm, mesh), 4),
                "chamfer": round(chamfer_distance(tm, mesh), 4),
            }
        }
    if quality:
        mesh = builders["bowl"]()
        views, masks, _ = render(mesh, 64)
        fast = reconstruct(views, masks, method="fast", resolution=64).to_trimesh()
        config = SDFConfig(iterations=150, image_size=64)
        start = time.perf_counter()
        tm = reconstruct(views, masks, method="quality", resolution=64, sdf_config=config).to_trimesh()
        out["bowl"]["quality_cpu_preset"] = {
            "settings": "64 px views, 64^3 carve, SDF grid 64^3, 150 iterations x 1024 rays x 64 samples",
            "seconds": round(time.perf_counter() - start, 1),
            "iou": round(volume_iou(tm, mesh), 4),
            "chamfer": round(chamfer_distance(tm, mesh), 4),
            "fast_same_settings": {
                "iou": round(volume_iou(fast, mesh), 4),
                "chamfer": round(chamfer_distance(fast, mesh), 4),
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the quality path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "torch_threads": torch.get_num_threads(),
            "fast_256": bench_fast_256(Path(tmp)),
            "shapes": bench_shapes(quality=not args.quick),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
