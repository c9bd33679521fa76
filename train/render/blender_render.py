"""Render one object into an MVDiffusion++ training folder (train/data/format.py) with Blender.

Runs under the Blender binary or with the ``bpy`` wheel (Python 3.11; ``pip install bpy``,
which needs numpy<2, so keep it in its own target folder or venv)::

    blender -b -P train/render/blender_render.py -- --object chair.glb --out renders/chair
    python train/render/blender_render.py --object chair.glb --out renders/chair --resolution 512

What it does (DESIGN section 3):

* imports the object (glb/gltf, obj, fbx, ply, stl, usd*, blend) with each format's own axis
  convention (glTF and OBJ are Y-up files; Blender converts them to its Z-up world);
* normalises it: bounding-box centre (over all mesh vertices, world space) to the origin,
  longest side to 1; the centre and scale are stored in cameras.json
  (``world = (source - center) * scale``);
* renders the 32 rig views and N condition views (default 10; cond_00 at azimuth 0) as RGBA
  PNG on a transparent film, Cycles (CPU or GPU, low samples), lit only by a uniform white
  world light with shadows switched off (even, shadowless shading), "Standard" colour
  transform (no filmic tone curve);
* writes cameras.json last (it marks the folder complete).

The cameras come from ``--plan plan.json`` (a cameras.json document from
``train.render.plan.camera_plan``; the launcher writes it, so the Blender binary never needs
torch) or, without ``--plan``, from ``mvdpp_core.cameras`` directly (needs torch importable).
Blender cameras are OpenGL-style: ``c2w_blender = c2w_opencv @ diag(1, -1, -1, 1)``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
OPENCV_TO_OPENGL = ((1.0, 0.0, 0.0, 0.0), (0.0, -1.0, 0.0, 0.0), (0.0, 0.0, -1.0, 0.0), (0.0, 0.0, 0.0, 1.0))
GPU_BACKENDS = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Render one object for MVDiffusion++ training.")
    p.add_argument("--object", required=True, type=Path, help="mesh file (glb, gltf, obj, fbx, ply, stl, usd, blend)")
    p.add_argument("--out", required=True, type=Path, help="output object folder")
    p.add_argument("--plan", type=Path, default=None, help="cameras plan JSON (default: sample with mvdpp_core)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--num-cond", type=int, default=10, help="number of condition views (1..10)")
    p.add_argument("--seed", type=int, default=0, help="condition-camera seed when no --plan is given")
    p.add_argument("--samples", type=int, default=32, help="Cycles samples per pixel")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="render threads (0 = all)")
    p.add_argument("--light-strength", type=float, default=1.0, help="uniform world light strength")
    p.add_argument("--overwrite", action="store_true", help="re-render a complete folder")
    return p.parse_args(argv)


def script_args(argv: list[str]) -> list[str]:
    """Our arguments: after ``--`` (blender -b -P script -- ...), else everything after the script."""
    return argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]


def load_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.plan is not None:
        return json.loads(args.plan.read_text())
    from train.render.plan import camera_plan

    return camera_plan(args.resolution, args.num_cond, args.seed)


def reset_scene(bpy: Any) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)


def import_object(bpy: Any, path: Path) -> None:
    """Import with the format's own axis convention (Blender's defaults)."""
    ext = path.suffix.lower()
    p = str(path)
    if ext in (".glb", ".gltf"):
        bpy.ops.import_scene.gltf(filepath=p)
    elif ext == ".obj":
        bpy.ops.wm.obj_import(filepath=p)
    elif ext == ".fbx":
        bpy.ops.import_scene.fbx(filepath=p)
    elif ext == ".ply":
        bpy.ops.wm.ply_import(filepath=p)
    elif ext == ".stl":
        bpy.ops.wm.stl_import(filepath=p)
    elif ext in (".usd", ".usda", ".usdc", ".usdz"):
        bpy.ops.wm.usd_import(filepath=p)
    elif ext == ".blend":
        with bpy.data.libraries.load(p, link=False) as (src, dst):
            dst.objects = list(src.objects)
        for obj in dst.objects:
            if obj is not None:
                bpy.context.scene.collection.objects.link(obj)
    else:
        raise ValueError(
            f"unsupported mesh format {ext!r} ({path.name}); use glb, gltf, obj, fbx, ply, stl, usd or blend."
        )


def mesh_bbox(bpy: Any) -> tuple[list[float], list[float]]:
    """World-space min and max over every evaluated mesh vertex in the scene."""
    import numpy as np

    depsgraph = bpy.context.evaluated_depsgraph_get()
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for obj in bpy.context.scene.objects:
        if obj.type != "MESH":
            continue
        evaluated = obj.evaluated_get(depsgraph)
        mesh = evaluated.to_mesh()
        co = np.empty(len(mesh.vertices) * 3)
        mesh.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3)  # n 3, object space
        m = np.array(evaluated.matrix_world)
        world = co @ m[:3, :3].T + m[:3, 3]
        evaluated.to_mesh_clear()
        if len(world):
            lo, hi = np.minimum(lo, world.min(0)), np.maximum(hi, world.max(0))
    if not np.isfinite(lo).all():
        raise ValueError("the imported file contains no mesh vertices; nothing to render.")
    return lo.tolist(), hi.tolist()


def normalise(bpy: Any) -> tuple[list[float], float]:
    """Parent every root object to one empty that centres the bbox and scales its longest side to 1."""
    lo, hi = mesh_bbox(bpy)
    center = [(a + b) / 2 for a, b in zip(lo, hi, strict=True)]
    extent = max(b - a for a, b in zip(lo, hi, strict=True))
    if extent <= 0:
        raise ValueError("the object's bounding box is degenerate (all vertices in one point).")
    scale = 1.0 / extent
    root = bpy.data.objects.new("mvdpp_normalize", None)
    bpy.context.scene.collection.objects.link(root)
    for obj in list(bpy.context.scene.objects):
        if obj.parent is None and obj is not root:
            obj.parent = root
    root.scale = (scale, scale, scale)
    root.location = tuple(-c * scale for c in center)
    bpy.context.view_layer.update()
    return center, scale


def setup_render(bpy: Any, args: argparse.Namespace, size: int) -> None:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.samples = args.samples
    scene.cycles.use_denoising = False
    scene.cycles.max_bounces = 4
    scene.render.film_transparent = True
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    settings = scene.render.image_settings
    settings.file_format, settings.color_mode, settings.color_depth = "PNG", "RGBA", "8"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    if args.threads:
        scene.render.threads_mode, scene.render.threads = "FIXED", args.threads
    scene.cycles.device = "GPU" if args.device == "gpu" and enable_gpu(bpy) else "CPU"


def enable_gpu(bpy: Any) -> bool:
    """Switch Cycles to the first GPU backend with a device; False (CPU) if none."""
    prefs = bpy.context.preferences.addons["cycles"].preferences
    for backend in GPU_BACKENDS:
        try:
            prefs.compute_device_type = backend
        except TypeError:
            continue
        prefs.get_devices()
        gpus = [d for d in prefs.devices if d.type == backend]
        if gpus:
            for d in gpus:
                d.use = True
            return True
    print("mvdpp render: no GPU backend found; rendering on the CPU", file=sys.stderr)
    return False


def setup_lighting(bpy: Any, strength: float) -> None:
    """A uniform white world light and no cast shadows: even, shadowless shading."""
    world = bpy.data.worlds.new("mvdpp_world")
    bpy.context.scene.world = world
    world.use_nodes = True
    background = world.node_tree.nodes["Background"]
    background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    background.inputs["Strength"].default_value = strength
    for obj in bpy.context.scene.objects:
        if obj.type == "MESH":
            obj.visible_shadow = False


def add_camera(bpy: Any, K: list[list[float]], size: int) -> Any:
    """A pinhole camera matching K (square pixels, centred principal point)."""
    fx, cx, cy = K[0][0], K[0][2], K[1][2]
    if abs(cx - size / 2) > 1e-6 or abs(cy - size / 2) > 1e-6 or abs(K[1][1] - fx) > 1e-6:
        raise ValueError(f"K={K} is not a square-pixel, centred pinhole for {size} px; the rig needs one.")
    data = bpy.data.cameras.new("mvdpp_camera")
    data.sensor_fit = "HORIZONTAL"
    data.angle = 2 * math.atan(size / (2 * fx))
    data.clip_start, data.clip_end = 0.01, 100.0
    camera = bpy.data.objects.new("mvdpp_camera", data)
    bpy.context.scene.collection.objects.link(camera)
    bpy.context.scene.camera = camera
    return camera


def blender_matrix(c2w_cv: list[list[float]]) -> Any:
    """OpenCV camera-to-world -> Blender camera matrix_world (OpenGL axes)."""
    from mathutils import Matrix

    return Matrix(c2w_cv) @ Matrix(OPENCV_TO_OPENGL)


def render_views(bpy: Any, camera: Any, views: list[dict], out: Path) -> None:
    scene = bpy.context.scene
    for view in views:
        camera.matrix_world = blender_matrix(view["c2w"])
        scene.render.filepath = str(out / view["file"])
        bpy.ops.render.render(write_still=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(script_args(sys.argv) if argv is None else argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from train.data import format as fmt

    if fmt.is_complete(args.out) and not args.overwrite:
        print(f"mvdpp render: {args.out} is complete; skipped (pass --overwrite to re-render)")
        return 0
    import bpy

    start = time.time()
    plan = load_plan(args)
    size = int(plan["image_size"][0])
    reset_scene(bpy)
    import_object(bpy, args.object.resolve())
    center, scale = normalise(bpy)
    setup_lighting(bpy, args.light_strength)
    setup_render(bpy, args, size)
    camera = add_camera(bpy, plan["K"], size)
    args.out.mkdir(parents=True, exist_ok=True)
    render_views(bpy, camera, plan["targets"] + plan["conditions"], args.out)
    doc = {
        **plan,
        "normalization": {"center": center, "scale": scale},
        "renderer": f"blender {bpy.app.version_string} cycles",
        "source": args.object.name,
    }
    fmt.write_cameras(args.out, doc)
    print(f"mvdpp render: {args.object.name} -> {args.out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
