"""The real ComfyUI 0.3.75 server runs the shipped workflows and turns bad input into node
errors that say what to do, while it keeps serving; Cancel stops sampling within a step.
The quality mesh (an SDF fit needing autograd under ComfyUI's inference mode) and a JPG
without alpha through the single-view workflow run here too.

One server for the module (started in a temporary base directory; the ComfyUI folder is
never written to), a tiny random checkpoint under the default name, sampling cut to 1 step.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from comfyui_harness import (
    DEFAULT_CHECKPOINT,
    NODE_IDS,
    PACK_FOLDER,
    ComfyServer,
    execution_error,
    node_error_text,
    nodes_of_type,
    prepare_base,
    workflow_files,
    workflow_to_prompt,
)
from PIL import Image

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
SIZE = 64  # tiny preset
EXTRA_CHECKPOINT = "extra_tiny.safetensors"
SPHERE_PNG = "sphere.png"
SPHERE_RADIUS = 0.35
FRONT_JPG = "mvdpp_example_front.jpg"


@pytest.fixture(scope="module")
def server(comfyui_dir: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("comfy_base")
    extra = tmp_path_factory.mktemp("extra_models")
    yaml_path = prepare_base(base, tiny_checkpoint, extra)
    shutil.copy(tiny_checkpoint, extra / EXTRA_CHECKPOINT)
    models = base / "models" / "mvdpp"
    torch.save({"state_dict": torch.zeros(3)}, models / "pickled.ckpt")
    (models / "corrupt.safetensors").write_bytes(b"\xff" * 300)
    write_sphere_png(base / "input" / SPHERE_PNG)
    write_jpg(base / "input" / "mvdpp_example_front.png", base / "input" / FRONT_JPG)
    comfy = ComfyServer.start(comfyui_dir, base, yaml_path)
    yield comfy
    comfy.stop()


def write_sphere_png(path: Path, size: int = SIZE) -> None:
    """An RGBA picture of a sphere (radius SPHERE_RADIUS at the origin) as every rig camera
    sees it: the same disc from all 32 views, so 32 copies are a consistent object."""
    import numpy as np

    from mvdpp_core import cameras

    c2w = cameras.rig_c2w(torch.float64)[:1]
    origins, dirs = cameras.pixel_rays(c2w, cameras.intrinsics(size), size, size)
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - SPHERE_RADIUS**2
    alpha = (b * b - c > 0)[0].numpy()
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 120, 60)
    rgba[..., 3] = alpha * 255
    Image.fromarray(rgba, "RGBA").save(path)


def write_jpg(png: Path, jpg: Path) -> None:
    """The example photo on a plain white backdrop, as a JPG (no alpha)."""
    rgba = Image.open(png).convert("RGBA")
    backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    Image.alpha_composite(backdrop, rgba).convert("RGB").save(jpg, quality=95)


@pytest.fixture(scope="module")
def object_info(server: ComfyServer) -> dict[str, Any]:
    return server.object_info()


def fast(prompt: dict[str, Any], tag: str, seed: int = 0) -> dict[str, Any]:
    """Cut sampling to 1 step without guidance, coarse meshing, outputs under ``tag/``."""
    for node_id in nodes_of_type(prompt, "MVDPP_MultiViewSampler"):
        prompt[node_id]["inputs"].update(steps=1, cfg=1.0, seed=seed)
    for node_id in nodes_of_type(prompt, "MVDPP_MeshExport"):
        prompt[node_id]["inputs"].update(resolution=48)
    for node_id in nodes_of_type(prompt, "SaveImage") + nodes_of_type(prompt, "MVDPP_MeshExport"):
        inputs = prompt[node_id]["inputs"]
        inputs["filename_prefix"] = inputs["filename_prefix"].replace("mvdpp/", f"{tag}/")
    return prompt


def saved_images(server: ComfyServer, outputs: dict[str, Any], prompt: dict[str, Any], suffix: str) -> list[Path]:
    savers = nodes_of_type(prompt, "SaveImage")
    (node_id,) = [n for n in savers if prompt[n]["inputs"]["filename_prefix"].endswith(suffix)]
    return [server.base / "output" / i["subfolder"] / i["filename"] for i in outputs[node_id]["images"]]


def test_server_lists_our_nodes_tooltips_and_both_model_folders(object_info):
    for node_id in NODE_IDS:
        info = object_info[node_id]
        assert info["category"].startswith("MVDiffusion++/")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    checkpoints = object_info["MVDPP_LoadModel"]["input"]["required"]["checkpoint"]
    options = checkpoints[1].get("options", checkpoints[0])
    assert {DEFAULT_CHECKPOINT, EXTRA_CHECKPOINT} <= set(options)  # models/mvdpp + extra_model_paths.yaml
    for core in ("LoadImage", "ImageBatch", "JoinImageWithAlpha", "MaskToImage", "SaveImage", "Preview3D", "SaveGLB"):
        assert core in object_info


def test_pack_imports_cleanly_at_server_start(server):
    log = server.log_tail(200_000)
    assert f"custom_nodes/{PACK_FOLDER}" in log  # listed among the imported packs
    ours = [line for line in log.splitlines() if PACK_FOLDER in line]
    assert not [line for line in ours if "Cannot import" in line or "IMPORT FAILED" in line or "Error" in line]


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.stem)
def test_shipped_workflow_runs_to_views_masks_grid_and_mesh(server, object_info, path):
    import trimesh

    workflow = json.loads(path.read_text())
    prompt = fast(workflow_to_prompt(workflow, object_info), path.stem)
    started = time.monotonic()
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    outputs = entry["outputs"]
    views = saved_images(server, outputs, prompt, "/views")
    masks = saved_images(server, outputs, prompt, "/masks")
    (grid,) = saved_images(server, outputs, prompt, "/grid")
    assert len(views) == 32 and len(masks) == 32
    assert Image.open(views[0]).size == (SIZE, SIZE) and Image.open(masks[31]).size == (SIZE, SIZE)
    assert Image.open(grid).size == (8 * SIZE, 4 * SIZE)
    # every LoadImage reached the model: the framed preview shows one image per input photo
    (framed,) = [n for n in nodes_of_type(prompt, "PreviewImage") if prompt[n]["inputs"]["images"][0] in
                 nodes_of_type(prompt, "MVDPP_MaskAwareEncode")]
    assert len(outputs[framed]["images"]) == len(nodes_of_type(prompt, "LoadImage"))
    (mesh_node,) = nodes_of_type(prompt, "MVDPP_MeshExport")
    (saved,) = outputs[mesh_node]["3d"]
    mesh_path = server.base / "output" / saved["subfolder"] / saved["filename"]
    assert saved["subfolder"] == path.stem and mesh_path.suffix == ".glb"
    mesh = trimesh.load(mesh_path, force="mesh")
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
    (preview,) = nodes_of_type(prompt, "Preview3D")
    assert outputs[preview]["result"][0] == f"{saved['subfolder']}/{saved['filename']}"
    print(f"{path.name}: {time.monotonic() - started:.1f} s")


def small_prompt(checkpoint: str = DEFAULT_CHECKPOINT, fill: float = 0.55, **encode: Any) -> dict[str, Any]:
    """LoadImage -> LoadMVDPP -> MaskAwareEncode -> PreviewImage of the framed view."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "mvdpp_example_front.png"}},
        "2": {"class_type": "MVDPP_LoadModel",
              "inputs": {"checkpoint": checkpoint, "device": "cpu", "dtype": "auto", "attention": "auto"}},
        "3": {"class_type": "MVDPP_MaskAwareEncode",
              "inputs": {"model": ["2", 0], "images": ["1", 0], "mask": ["1", 1],
                         "mask_convention": "alpha-inverted (LoadImage MASK)", "background_tolerance": 0.1,
                         "object_fill": fill, **encode}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }


def test_checkpoint_in_an_extra_model_paths_folder_is_found_and_loads(server):
    entry = server.run(small_prompt(EXTRA_CHECKPOINT))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    assert len(entry["outputs"]["4"]["images"]) == 1  # the model loaded and framed the photo


def _eleven_images() -> dict[str, Any]:
    prompt = small_prompt()
    prompt["7"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 11}}
    prompt["3"]["inputs"].update(images=["7", 0])
    del prompt["3"]["inputs"]["mask"]
    return prompt


def _mask_of_other_size() -> dict[str, Any]:
    prompt = small_prompt(mask_convention="foreground=1 (background removal nodes)")
    prompt["7"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    prompt["3"]["inputs"]["mask"] = ["7", 0]
    return prompt


def _escaping_prefix() -> dict[str, Any]:
    prompt = small_prompt()
    prompt["7"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 32}}
    prompt["8"] = {"class_type": "MVDPP_MeshExport",
                   "inputs": {"views": ["7", 0], "masks": ["1", 1], "method": "fast", "resolution": 32,
                              "format": "glb", "filename_prefix": "../escaped/mesh"}}
    del prompt["4"]  # the mesh is the only output: the whole prompt is refused (HTTP 400)
    return prompt


def _sampled(**sampler: Any) -> dict[str, Any]:
    """small_prompt with a 1-step sampler whose views are the only output."""
    prompt = small_prompt()
    prompt["5"] = {"class_type": "MVDPP_MultiViewSampler",
                   "inputs": {"model": ["2", 0], "cond": ["3", 0], "seed": 0, "steps": 1, "sampler": "ddim",
                              "cfg": 1.0, **sampler}}
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
    return prompt


def _loader(**values: Any) -> dict[str, Any]:
    prompt = small_prompt()
    prompt["2"]["inputs"].update(values)
    return prompt


def _view_grid(**grid: Any) -> dict[str, Any]:
    prompt = small_prompt()
    prompt["6"] = {"class_type": "MVDPP_ViewGrid",
                   "inputs": {"views": ["1", 0], "mode": "views", "elevation": "0", "indices": "0",
                              "background": "#FFFFFF", **grid}}
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    return prompt


def _mesh_prefix(prefix: str) -> dict[str, Any]:
    prompt = _escaping_prefix()
    prompt["8"]["inputs"]["filename_prefix"] = prefix
    return prompt


def sphere_mesh_prompt(method: str, invert: bool = True, prefix: str = "sphere/mesh") -> dict[str, Any]:
    """32 copies of the sphere picture (a consistent object on the rig) -> Mesh Export.

    LoadImage's MASK is 1 where the picture is transparent; InvertMask makes it the object
    mask (invert=False keeps it inverted)."""
    mask = ["2", 0] if invert else ["1", 1]
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": SPHERE_PNG}},
        "2": {"class_type": "InvertMask", "inputs": {"mask": ["1", 1]}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": mask}},
        "4": {"class_type": "RepeatImageBatch", "inputs": {"image": ["3", 0], "amount": 32}},
        "5": {"class_type": "ImageToMask", "inputs": {"image": ["4", 0], "channel": "red"}},
        "6": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 32}},
        "7": {"class_type": "MVDPP_MeshExport",
              "inputs": {"views": ["6", 0], "masks": ["5", 0], "method": method, "resolution": 32, "format": "ply",
                         "filename_prefix": prefix}},
    }


# (case, prompt, rejected at validation (HTTP 400) or at run time, fragments of the message)
BAD_INPUTS = [
    ("eleven_images", _eleven_images, False, ["11 condition images", "1 to 10", "Remove 1 image"]),
    ("mask_size", _mask_of_other_size, False, ["mask size 64x64 differs from image size 128x128", "resize"]),
    ("inverted_mask", lambda: small_prompt(mask_convention="foreground=1 (background removal nodes)"), False,
     ["looks inverted", "Set mask_convention to 'alpha-inverted (LoadImage MASK)'"]),
    ("pickled_checkpoint", lambda: small_prompt("pickled.ckpt"), True, ["pickle", "never loaded", ".safetensors"]),
    ("corrupt_checkpoint", lambda: small_prompt("corrupt.safetensors"), True, ["corrupt"]),
    ("escaping_prefix", _escaping_prefix, True, ["outside ComfyUI's output folder", "'..'"]),
    ("nul_prefix", lambda: _mesh_prefix("mvdpp/me\x00sh"), True, ["control character", "remove"]),
    ("long_prefix", lambda: _mesh_prefix("mvdpp/" + "m" * 300), True, ["300 bytes", "at most 239"]),
    ("cfg_nan", lambda: _sampled(cfg=math.nan), True, ["cfg=nan is not a finite number", "1.0 to 20.0"]),
    ("unknown_sampler", lambda: _sampled(sampler="euler"), True, ["sampler 'euler' is not one of"]),
    ("unknown_dtype", lambda: _loader(dtype="float16"), True, ["dtype 'float16' is not one of", "'bf16'"]),
    ("unknown_device", lambda: _loader(device="gpu"), True, ["device 'gpu' is not one of", "'cpu'"]),
    ("grid_indices_typo", lambda: _view_grid(indices="0, 8, 1b"), True, ["cannot read view index '1b'"]),
    ("grid_background", lambda: _view_grid(mode="grid", background="white"), True, ["'white' is not a hex colour"]),
    ("inverted_mesh_masks", lambda: sphere_mesh_prompt("fast", invert=False, prefix="inverted/mesh"), False,
     ["masks of 32 views", "look inverted", "InvertMask"]),
]


@pytest.mark.parametrize(("case", "build", "at_validation", "fragments"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_node_error_that_tells_the_fix_and_the_server_keeps_serving(
    server, case, build, at_validation, fragments
):
    status, reply = server.queue(build())
    if at_validation:
        assert status == 400, reply
        message = node_error_text(reply)
    else:
        assert status == 200, reply
        entry = server.wait(reply["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        message = execution_error(entry)["exception_message"]
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"
    assert not (server.base / "escaped").exists()
    assert not list((server.base / "output").glob("inverted*"))
    # the next good prompt runs (a new object_fill so nothing is served from the cache)
    fill = 0.31 + 0.04 * [c[0] for c in BAD_INPUTS].index(case)
    entry = server.run(small_prompt(fill=fill))
    assert entry["status"]["status_str"] == "success", execution_error(entry)


def test_quality_mesh_runs_in_the_engine_and_recovers_the_sphere(server):
    """ComfyUI runs nodes under torch.inference_mode(); the SDF fit needs autograd."""
    import trimesh

    started = time.monotonic()
    entry = server.run(sphere_mesh_prompt("quality", prefix="quality/sphere"), timeout=840)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (saved,) = entry["outputs"]["7"]["3d"]
    mesh = trimesh.load(server.base / "output" / saved["subfolder"] / saved["filename"], force="mesh")
    radii = (mesh.vertices ** 2).sum(axis=1) ** 0.5
    seconds = time.monotonic() - started
    print(f"quality mesh: {len(mesh.faces)} faces, mean radius {radii.mean():.3f}, {seconds:.1f} s")
    assert len(mesh.faces) > 100
    assert abs(radii.mean() - SPHERE_RADIUS) < 0.06 and radii.std() < 0.05


def framed_preview(server: ComfyServer, entry: dict[str, Any], prompt: dict[str, Any]) -> Any:
    """The framed condition view that the PreviewImage after MaskAwareEncode shows, as an array."""
    import numpy as np

    encoders = nodes_of_type(prompt, "MVDPP_MaskAwareEncode")
    (node,) = [n for n in nodes_of_type(prompt, "PreviewImage") if prompt[n]["inputs"]["images"][0] in encoders]
    (image,) = entry["outputs"][node]["images"]
    return np.asarray(Image.open(server.base / image["type"] / image["subfolder"] / image["filename"]), dtype=float)


def test_single_view_workflow_takes_a_jpg_without_alpha(server, object_info):
    """LoadImage gives a 64x64 all-zero placeholder MASK for a JPG: the backdrop is cut by colour,
    and the object is framed as from the PNG's alpha."""
    (path,) = [p for p in workflow_files() if p.stem == "mvdpp_single_view"]
    frames = {}
    for image in ("mvdpp_example_front.png", FRONT_JPG):
        prompt = fast(workflow_to_prompt(json.loads(path.read_text()), object_info), f"jpg_{Path(image).suffix[1:]}")
        (loader,) = nodes_of_type(prompt, "LoadImage")
        prompt[loader]["inputs"]["image"] = image
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        frames[image] = framed_preview(server, entry, prompt)
        (mesh_node,) = nodes_of_type(prompt, "MVDPP_MeshExport")
        assert entry["outputs"][mesh_node]["3d"]
    png, jpg = (frames[k].min(axis=-1) < 200 for k in ("mvdpp_example_front.png", FRONT_JPG))  # object pixels
    iou = (png & jpg).sum() / (png | jpg).sum()
    print(f"framed object from the JPG vs the PNG's alpha: IoU {iou:.3f}")
    assert png.sum() > 100 and iou > 0.9


async def _interrupt_during_sampling(server: ComfyServer, prompt: dict[str, Any], sampler_id: str) -> dict[str, Any]:
    """Queue over HTTP, watch the websocket, POST /interrupt after step 2; returns timings."""
    import aiohttp

    client_id = uuid.uuid4().hex
    steps: list[tuple[int, float]] = []
    interrupted_at = None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                assert r.status == 200, await r.text()
            while True:
                message = await ws.receive(timeout=180)
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                kind, data = event["type"], event.get("data", {})
                if kind == "progress" and data.get("node") == sampler_id:
                    steps.append((data["value"], time.monotonic()))
                    if data["value"] == 2 and interrupted_at is None:
                        async with session.post(f"{server.url}/interrupt") as r:
                            assert r.status == 200
                        interrupted_at = time.monotonic()
                if kind in ("execution_interrupted", "execution_success", "execution_error"):
                    return {"end": kind, "ended_at": time.monotonic(), "steps": steps, "interrupted_at": interrupted_at}


def test_interrupt_stops_sampling_within_one_step(server, object_info):
    workflow = json.loads(workflow_files()[0].read_text())
    prompt = fast(workflow_to_prompt(workflow, object_info), "interrupt", seed=12345)
    (sampler_id,) = nodes_of_type(prompt, "MVDPP_MultiViewSampler")
    prompt[sampler_id]["inputs"].update(steps=30, sampler="ddim")
    result = asyncio.run(_interrupt_during_sampling(server, prompt, sampler_id))
    assert result["end"] == "execution_interrupted"
    assert result["interrupted_at"] is not None
    after = [value for value, at in result["steps"] if at > result["interrupted_at"]]
    step_time = result["steps"][1][1] - result["steps"][0][1]
    stop_time = result["ended_at"] - result["interrupted_at"]
    print(f"steps reported after interrupt: {len(after)}; step {step_time:.2f} s; stopped after {stop_time:.2f} s")
    assert len(after) <= 1  # at most the step that was running when Cancel came
    assert max(v for v, _ in result["steps"]) <= 3
    assert stop_time < 2 * step_time + 2.0
    # and the server serves the next prompt
    entry = server.run(small_prompt(fill=0.7))
    assert entry["status"]["status_str"] == "success"
