"""The nodes called directly (classmethod ``execute``) inside an in-process ComfyUI:
type conversion, the mask convention, every validation error, progress and cancel."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from comfyui_harness import NODE_IDS, import_comfyui, load_pack

SIZE = 64  # the tiny preset's image size


@pytest.fixture(scope="module")
def comfy(comfyui_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """ComfyUI (CPU) and this pack, imported in-process, with temporary model/output folders."""
    import_comfyui(comfyui_dir)
    import comfy.model_management
    import comfy.utils
    import folder_paths

    root = tmp_path_factory.mktemp("comfy")
    folder_paths.models_dir = str(root / "models")
    folder_paths.set_output_directory(str(root / "output"))
    (root / "output").mkdir()
    pack = load_pack()
    extension = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    return SimpleNamespace(
        pack=pack, extension=extension, nodes={n.GET_SCHEMA().node_id: n for n in nodes}, root=root,
        folder_paths=folder_paths, mm=comfy.model_management, utils=comfy.utils,
    )


@pytest.fixture(scope="module")
def model_dir(comfy: SimpleNamespace) -> Path:
    path = Path(comfy.folder_paths.models_dir) / "mvdpp"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def loaded(comfy: SimpleNamespace, model_dir: Path, tiny_checkpoint: Path):
    (model_dir / "tiny.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    return comfy.nodes["MVDPP_LoadModel"].execute("tiny.safetensors", "cpu", "auto", "auto")[0]


def disc(size: int = 96, radius: float = 0.3, center: tuple[float, float] = (0.5, 0.45)) -> torch.Tensor:
    """A (size, size) float disc mask, off-centre so recentring has something to do."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (((xs / size - center[0]) ** 2 + (ys / size - center[1]) ** 2) < radius**2).float()


def rgba_batch(n: int, size: int = 96) -> torch.Tensor:
    """IMAGE [n, H, W, 4]: coloured discs with straight alpha (an RGBA PNG's IMAGE)."""
    mask = disc(size)
    colours = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.3, 0.9], [0.2, 0.8, 0.2]])
    rgb = torch.stack([mask[..., None] * colours[i % 3] + (1 - mask[..., None]) * 0.5 for i in range(n)])
    return torch.cat([rgb, mask.expand(n, -1, -1)[..., None]], dim=-1)


def encode(comfy, loaded, images, mask=None, convention=None, tolerance=0.1):
    node = comfy.nodes["MVDPP_MaskAwareEncode"]
    enc = comfy.pack.nodes.encode
    return node.execute(loaded, images, convention or enc.FOREGROUND_ONE, tolerance, 0.55, mask)


# --- registration ------------------------------------------------------------------------


def test_entrypoint_gives_the_five_nodes_with_tooltips(comfy):
    assert sorted(comfy.nodes) == sorted(NODE_IDS)
    for node_id, node in comfy.nodes.items():
        schema = node.GET_SCHEMA()
        assert schema.category.startswith("MVDiffusion++/"), node_id
        assert schema.display_name and "_" not in schema.display_name, node_id
        missing = [i.id for i in schema.inputs if not (i.tooltip and len(i.tooltip) > 15)]
        assert not missing, f"{node_id} inputs without a tooltip: {missing}"
    assert comfy.nodes["MVDPP_MeshExport"].GET_SCHEMA().is_output_node


def test_model_folder_keeps_yaml_paths_and_filters_extensions(comfy, tmp_path):
    fp = comfy.folder_paths
    saved = fp.folder_names_and_paths.pop("mvdpp")
    try:
        # extra_model_paths.yaml is read before packs load: it creates the folder entry first.
        fp.add_model_folder_path("mvdpp", str(tmp_path))
        (tmp_path / "from_yaml.safetensors").write_bytes(b"x")
        (tmp_path / "notes.txt").write_text("not a model")
        comfy.pack.nodes.register_model_folder()
        paths, extensions = fp.folder_names_and_paths["mvdpp"]
        assert paths[0] == str(tmp_path) and paths[1].endswith("models/mvdpp")
        names = comfy.pack.nodes.loader.checkpoint_names()
        assert "from_yaml.safetensors" in names and "notes.txt" not in names
        assert ".ckpt" in extensions  # listed so that choosing one explains why it is refused
    finally:
        fp.folder_names_and_paths["mvdpp"] = saved
        fp.filename_list_cache.clear()


def test_embedded_default_listed_only_when_shipped_and_shadowed_by_user_file(comfy, model_dir, tmp_path, monkeypatch):
    loader = comfy.pack.nodes.loader
    embedded = tmp_path / "mvdpp_default.safetensors"
    monkeypatch.setattr(loader, "EMBEDDED_DEFAULT", embedded)
    assert "mvdpp_default.safetensors" not in loader.checkpoint_names()
    embedded.write_bytes(b"x")
    assert loader.checkpoint_names()[0] == "mvdpp_default.safetensors"
    assert loader.checkpoint_path("mvdpp_default.safetensors") == embedded
    user_copy = model_dir / "mvdpp_default.safetensors"
    user_copy.write_bytes(b"y")
    try:
        comfy.folder_paths.filename_list_cache.clear()
        assert loader.checkpoint_names().count("mvdpp_default.safetensors") == 1
        assert loader.checkpoint_path("mvdpp_default.safetensors") == user_copy
    finally:
        user_copy.unlink()
        comfy.folder_paths.filename_list_cache.clear()


# --- LoadMVDPP -----------------------------------------------------------------------------


def test_load_gives_the_model_on_the_cpu(comfy, loaded):
    assert loaded.name == "tiny.safetensors" and loaded.clip_vision is None
    assert loaded.model.device.type == "cpu" and loaded.model.dtype == torch.float32
    assert loaded.model.config.image_size == SIZE and not loaded.model.training


def test_load_bf16_and_device_errors(comfy, loaded):
    load = comfy.nodes["MVDPP_LoadModel"]
    bf16 = load.execute("tiny.safetensors", "cpu", "bf16", "sdpa")[0].model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="'fp16' is not supported on the CPU.*'fp32' or 'bf16'"):
        load.execute("tiny.safetensors", "cpu", "fp16", "auto")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA GPU; choose 'auto' or 'cpu'"):
            load.execute("tiny.safetensors", "cuda", "auto", "auto")
        with pytest.raises(ValueError, match="xformers.*needs CUDA.*use backend 'sdpa'"):
            load.execute("tiny.safetensors", "cpu", "auto", "xformers")


def _mismatched_copy(source: Path, target: Path) -> None:
    """The tiny bundle with a config claiming other channel widths than its tensors have."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    config["unet"]["block_out_channels"] = [32, 64]
    meta["config"] = json.dumps(config)
    save_file(load_file(str(source)), str(target), metadata=meta)


def test_bad_checkpoints_give_errors_that_say_what_to_do(comfy, model_dir, tiny_checkpoint):
    load = comfy.nodes["MVDPP_LoadModel"]
    torch.save({"weights": torch.zeros(2)}, model_dir / "pickled.ckpt")
    torch.save({"weights": torch.zeros(2)}, model_dir / "renamed_pickle.safetensors")
    (model_dir / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    (model_dir / "truncated.safetensors").write_bytes(tiny_checkpoint.read_bytes()[:-4096])
    _mismatched_copy(tiny_checkpoint, model_dir / "mismatch.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    assert load.validate_inputs("tiny.safetensors") is True
    assert "pickle" in load.validate_inputs("pickled.ckpt") and "safetensors" in load.validate_inputs("pickled.ckpt")
    assert "pickled" in load.validate_inputs("renamed_pickle.safetensors")
    assert "corrupt" in load.validate_inputs("corrupt.safetensors")
    assert "models/mvdpp" in load.validate_inputs("missing.safetensors")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load.execute("truncated.safetensors", "cpu", "auto", "auto")
    with pytest.raises(ValueError, match="does not match its architecture config.*re-export"):
        load.execute("mismatch.safetensors", "cpu", "auto", "auto")
    with pytest.raises(ValueError, match="never loaded"):
        load.execute("pickled.ckpt", "cpu", "auto", "auto")


# --- MaskAwareEncode -------------------------------------------------------------------------


def test_encode_converts_rgba_image_to_framed_core_views(comfy, loaded):
    out = encode(comfy, loaded, rgba_batch(2))
    cond, framed = out[0], out[1]
    assert cond.images.shape == (2, 3, SIZE, SIZE) and cond.masks.shape == (2, 1, SIZE, SIZE)
    assert framed.shape == (2, SIZE, SIZE, 3) and framed.dtype == torch.float32
    assert cond.embeddings is None
    # recentred: the off-centre disc now sits in the middle and spans ~55 % of the side.
    ys, xs = torch.nonzero(cond.masks[0, 0] > 0.5, as_tuple=True)
    assert abs((xs.float().mean() + 0.5) / SIZE - 0.5) < 0.03 and abs((ys.float().mean() + 0.5) / SIZE - 0.5) < 0.03
    assert abs((xs.max() - xs.min() + 1).item() / SIZE - 0.55) < 0.05
    # on white outside the object, the object's colour inside.
    torch.testing.assert_close(framed[0, 0, 0], torch.ones(3))
    torch.testing.assert_close(framed[0, SIZE // 2, SIZE // 2], torch.tensor([0.9, 0.2, 0.1]), atol=0.02, rtol=0)


def test_mask_convention_loadimage_mask_equals_alpha(comfy, loaded):
    enc = comfy.pack.nodes.encode
    rgba = rgba_batch(1)
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    loadimage_mask = 1.0 - alpha  # what core LoadImage gives: 1 where transparent
    from_alpha = encode(comfy, loaded, rgba)[0]
    from_inverted = encode(comfy, loaded, rgb, loadimage_mask, enc.ALPHA_INVERTED)[0]
    from_foreground = encode(comfy, loaded, rgb, alpha, enc.FOREGROUND_ONE)[0]
    torch.testing.assert_close(from_inverted.masks, from_alpha.masks)
    torch.testing.assert_close(from_foreground.masks, from_alpha.masks)
    with pytest.raises(ValueError, match="looks inverted.*Set mask_convention to 'alpha-inverted"):
        encode(comfy, loaded, rgb, loadimage_mask, enc.FOREGROUND_ONE)
    with pytest.raises(ValueError, match="looks inverted.*Set mask_convention to 'foreground=1"):
        encode(comfy, loaded, rgb, alpha, enc.ALPHA_INVERTED)


def test_mask_input_wins_over_alpha(comfy, loaded):
    rgba = rgba_batch(1)
    rgba[..., 3] = 1.0  # an opaque PNG: alpha says "all object"
    small = disc(96, radius=0.15)[None]
    cond = encode(comfy, loaded, rgba, small)[0]
    reference = encode(comfy, loaded, torch.cat([rgba[..., :3], small[..., None]], dim=-1))[0]
    torch.testing.assert_close(cond.masks, reference.masks)


def test_plain_backdrop_is_segmented_without_mask_or_alpha(comfy, loaded):
    rgba = rgba_batch(2)
    with_alpha = encode(comfy, loaded, rgba)[0]
    segmented = encode(comfy, loaded, rgba[..., :3].contiguous())[0]
    a, b = with_alpha.masks > 0.5, segmented.masks > 0.5
    iou = (a & b).sum() / (a | b).sum()
    assert iou > 0.97
    opaque = rgba.clone()
    opaque[..., 3] = 1.0  # an RGBA file without transparency: its alpha outlines nothing
    torch.testing.assert_close(encode(comfy, loaded, opaque)[0].masks, segmented.masks)


def test_blank_mask_of_an_opaque_picture_cuts_the_backdrop_and_an_empty_one_is_explained(comfy, loaded):
    enc = comfy.pack.nodes.encode
    rgb = rgba_batch(1)[..., :3]
    opaque_mask = torch.zeros(1, 96, 96)  # LoadImage's MASK of an opaque PNG: nothing transparent
    segmented = encode(comfy, loaded, rgb)[0]
    torch.testing.assert_close(encode(comfy, loaded, rgb, opaque_mask, enc.ALPHA_INVERTED)[0].masks, segmented.masks)
    torch.testing.assert_close(encode(comfy, loaded, rgb, 1 - opaque_mask, enc.FOREGROUND_ONE)[0].masks,
                               segmented.masks)
    # the same mask read as foreground=1 says "no object at all": refused, not guessed around
    with pytest.raises(ValueError, match="same value everywhere.*no pixel as object.*mask_convention.*"
                       "background-removal node.*disconnect 'mask'"):
        encode(comfy, loaded, rgb, opaque_mask, enc.FOREGROUND_ONE)


def test_loadimage_placeholder_mask_of_a_jpg_counts_as_no_mask(comfy, loaded):
    """Core LoadImage gives a 64x64 all-zero MASK for a picture without alpha, whatever its size."""
    enc = comfy.pack.nodes.encode
    rgb = rgba_batch(1)[..., :3]
    placeholder = torch.zeros(1, 64, 64)
    segmented = encode(comfy, loaded, rgb)[0]
    for convention in (enc.ALPHA_INVERTED, enc.FOREGROUND_ONE):
        torch.testing.assert_close(encode(comfy, loaded, rgb, placeholder, convention)[0].masks, segmented.masks)
    # a 64x64 mask with content is a real mask of the wrong size: still refused
    with pytest.raises(ValueError, match="mask size 64x64 differs from image size 96x96"):
        encode(comfy, loaded, rgb, disc(64)[None])


def test_views_without_outline_are_cut_out_view_by_view(comfy, loaded):
    """Two photos, one masked and one opaque (its mask all object): each keeps its own source."""
    enc = comfy.pack.nodes.encode
    rgb = rgba_batch(2)[..., :3]
    small = disc(96, radius=0.15)
    loadimage_masks = torch.stack([1 - small, torch.zeros(96, 96)])  # view 1: an opaque picture
    cond = encode(comfy, loaded, rgb, loadimage_masks, enc.ALPHA_INVERTED)[0]
    torch.testing.assert_close(cond.masks[0], encode(comfy, loaded, rgb[:1], small[None])[0].masks[0])
    torch.testing.assert_close(cond.masks[1], encode(comfy, loaded, rgb[1:])[0].masks[0])
    clutter = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="^view 1: .*not a plain backdrop"):  # numbered as in the batch
        encode(comfy, loaded, torch.cat([rgb[:1], clutter]), loadimage_masks, enc.ALPHA_INVERTED)


def test_encode_names_core_background_removal_where_comfyui_has_it(comfy, loaded, monkeypatch):
    """A photo that needs a mask: where the running ComfyUI has core background removal (later
    releases, with their BackgroundRemoval socket type), the error and the mask tooltip name its
    Remove Background node and the convention its MASK takes; in 0.3.75, which has none, the
    message is the core's own. Errors that are not about a missing mask never get the hint."""
    enc = comfy.pack.nodes.encode
    clutter = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(2))
    tooltip = {i.id: i.tooltip for i in comfy.nodes["MVDPP_MaskAwareEncode"].GET_SCHEMA().inputs}["mask"]
    assert not comfy.pack.nodes._comfy.core_background_removal() and "Remove Background" not in tooltip
    with pytest.raises(ValueError, match="background-removal node") as plain:
        encode(comfy, loaded, clutter)
    assert "Remove Background" not in str(plain.value)

    socket = type("BackgroundRemoval", (), {})  # later releases' socket type
    monkeypatch.setattr(comfy.pack.nodes._comfy.io, "BackgroundRemoval", socket, raising=False)
    assert comfy.pack.nodes._comfy.core_background_removal()
    tooltip = {i.id: i.tooltip for i in comfy.nodes["MVDPP_MaskAwareEncode"].GET_SCHEMA().inputs}["mask"]
    assert "Core Remove Background" in tooltip
    with pytest.raises(ValueError) as hinted:
        encode(comfy, loaded, clutter)
    assert str(hinted.value).startswith(str(plain.value))  # the core message first, whole
    assert "Remove Background (with Load Background Removal Model" in str(hinted.value)
    assert f"mask_convention '{enc.FOREGROUND_ONE}'" in str(hinted.value)
    with pytest.raises(ValueError, match="marks the image border as object.*Remove Background"):
        encode(comfy, loaded, rgba_batch(1)[..., :3], 1 - disc(96)[None])  # an inverted mask
    with pytest.raises(ValueError, match="11 condition images") as other:
        encode(comfy, loaded, rgba_batch(11))
    assert "Remove Background" not in str(other.value)


def test_segment_recovers_disc_and_refuses_clutter():
    from mvdpp_core.segment import border_foreground_fraction, inverted_views, segment_uniform_background

    mask = disc(80)
    holed = mask.clone()
    holed[36:40, 36:40] = 0  # object pixels with the backdrop's colour
    image = (holed * 0.1 + (1 - holed) * 0.8).expand(3, -1, -1)[None]  # dark object, light grey backdrop
    image = image + 0.01 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    found = segment_uniform_background(image.clamp(0, 1))
    assert found.shape == (1, 1, 80, 80)
    assert torch.equal(found[0, 0] > 0.5, mask > 0.5)  # hole filled, noise ignored
    assert border_foreground_fraction(found).item() == 0.0
    assert border_foreground_fraction(1 - found).item() == 1.0
    assert inverted_views(torch.cat([found, 1 - found, torch.ones_like(found)])) == [1]  # all-object is blank
    # An undecided border (averaged estimates that disagree, e.g. an untrained model's) is not inverted; a
    # slightly soft inverted one still is.
    assert inverted_views(torch.cat([0.2 + 0.5 * (1 - found), 0.95 * (1 - found)])) == [1]
    clutter = torch.rand(1, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="not a plain backdrop.*background-removal node"):
        segment_uniform_background(clutter)
    with pytest.raises(ValueError, match="no pixel differs.*lower the tolerance"):
        segment_uniform_background(torch.full((1, 3, 32, 32), 0.5))
    with pytest.raises(ValueError, match="tolerance=1.5; allowed"):
        segment_uniform_background(image, tolerance=1.5)


def test_encode_errors_name_the_problem_and_the_fix(comfy, loaded):
    rgba = rgba_batch(1)
    with pytest.raises(ValueError, match="11 condition images.*1 to 10. Remove 1 image"):
        encode(comfy, loaded, rgba_batch(11))
    with pytest.raises(ValueError, match="0 condition images.*connect 1 to 10 photos"):
        encode(comfy, loaded, rgba[:0])
    with pytest.raises(ValueError, match="2 mask\\(s\\) for 1 image\\(s\\); give one mask per image"):
        encode(comfy, loaded, rgba[..., :3], disc(96).expand(2, -1, -1))
    with pytest.raises(ValueError, match="mask size 64x64 differs from image size 96x96.*resize"):
        encode(comfy, loaded, rgba[..., :3], disc(64)[None])
    with pytest.raises(ValueError, match="IMAGE has shape \\(1, 96, 96, 2\\); expected \\[batch"):
        encode(comfy, loaded, rgba[..., :2])
    with pytest.raises(TypeError, match="expected an IMAGE tensor, got list"):
        encode(comfy, loaded, [rgba])
    with pytest.raises(ValueError, match="outside \\[0, 1\\]; scale them"):
        encode(comfy, loaded, rgba * 2)


class FakeClipVision:
    """Stands in for ComfyUI's ClipVisionModel: records what it saw, returns fixed embeddings."""

    def __init__(self, dim: int):
        self.dim, self.seen = dim, None

    def encode_image(self, image: torch.Tensor) -> SimpleNamespace:
        self.seen = image
        return SimpleNamespace(image_embeds=torch.ones(image.shape[0], self.dim))


def test_clip_vision_embeddings_replace_the_bundled_encoder(comfy, loaded):
    pack_loader = comfy.pack.nodes.loader
    clip = FakeClipVision(loaded.model.config.unet.cross_attention_dim)
    with_clip = pack_loader.LoadedModel(loaded.model, loaded.name, clip)
    cond = encode(comfy, with_clip, rgba_batch(2))[0]
    assert cond.embeddings.shape == (2, clip.dim)
    assert clip.seen.shape == (2, SIZE, SIZE, 3)  # a ComfyUI IMAGE of the framed objects on white
    torch.testing.assert_close(clip.seen[0, 0, 0], torch.ones(3))
    wrong = pack_loader.LoadedModel(loaded.model, loaded.name, FakeClipVision(7))
    with pytest.raises(ValueError, match="embeddings of shape \\(2, 7\\); this checkpoint needs 32-d"):
        encode(comfy, wrong, rgba_batch(2))


# --- MultiViewSampler ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(comfy, loaded):
    """One 2-step run of the sampler node, with ComfyUI's progress hook recorded."""
    cond = encode(comfy, loaded, rgba_batch(1))[0]
    calls: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        views, masks = comfy.nodes["MVDPP_MultiViewSampler"].execute(loaded, cond, 7, 2, "ddim", 1.0).args
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return SimpleNamespace(cond=cond, views=views, masks=masks, progress=calls)


def test_sampler_outputs_32_views_and_masks_as_comfy_types(sampled):
    assert sampled.views.shape == (32, SIZE, SIZE, 3) and sampled.masks.shape == (32, SIZE, SIZE)
    for t in (sampled.views, sampled.masks):
        assert t.dtype == torch.float32 and t.device.type == "cpu" and 0 <= t.min() and t.max() <= 1
    assert sampled.progress == [(1, 2), (2, 2)]  # the bar advances once per step


def test_sampler_node_equals_core_generate_without_second_recentring(sampled, loaded):
    from einops import rearrange

    from mvdpp_core.pipeline import generate

    core = generate(loaded.model, sampled.cond, seed=7, steps=2, sampler="ddim", guidance=1.0)
    torch.testing.assert_close(sampled.views, rearrange(core.images, "v c h w -> v h w c").clamp(0, 1))
    torch.testing.assert_close(sampled.masks, core.masks[:, 0].clamp(0, 1))


def test_sampler_node_averaging_is_the_core_average_on_one_progress_bar(comfy, sampled, loaded):
    """The node's mirror_average and average_seeds are the core's: the same views, and one bar
    over every pass."""
    from einops import rearrange

    from mvdpp_core.pipeline import generate

    calls: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        views, masks = comfy.nodes["MVDPP_MultiViewSampler"].execute(loaded, sampled.cond, 7, 2, "ddim", 1.0,
                                                                     mirror_average=True, average_seeds=2).args
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert calls == [(i, 8) for i in range(1, 9)]
    core = generate(loaded.model, sampled.cond, seed=7, steps=2, sampler="ddim", guidance=1.0, mirror_average=True,
                    average_seeds=2)
    torch.testing.assert_close(views, rearrange(core.images, "v c h w -> v h w c").clamp(0, 1))
    torch.testing.assert_close(masks, core.masks[:, 0].clamp(0, 1))
    assert (masks - sampled.masks).abs().max() > 1e-4, "averaging changes the views of a model that is not symmetric"


def test_sampler_node_input_average_is_the_cores_with_a_bar_over_each_photos_passes(comfy, loaded):
    """With 2 photos, input_average runs one generation per photo, on one bar, and gives the core's views."""
    from einops import rearrange

    from mvdpp_core.pipeline import generate

    cond = encode(comfy, loaded, rgba_batch(2))[0]
    calls: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        views, masks = comfy.nodes["MVDPP_MultiViewSampler"].execute(loaded, cond, 7, 2, "ddim", 1.0,
                                                                     input_average=True).args
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert calls == [(i, 4) for i in range(1, 5)]
    core = generate(loaded.model, cond, seed=7, steps=2, sampler="ddim", guidance=1.0, input_average=True)
    torch.testing.assert_close(views, rearrange(core.images, "v c h w -> v h w c").clamp(0, 1))
    torch.testing.assert_close(masks, core.masks[:, 0].clamp(0, 1))


def test_cancel_stops_sampling_within_one_step(comfy, loaded, sampled, monkeypatch):
    unet = loaded.model.unet
    calls = {"unet": 0, "at_interrupt": None}
    original = unet.forward

    def counting_forward(*args, **kwargs):
        calls["unet"] += 1
        return original(*args, **kwargs)

    def hook(value, total, preview, node_id=None):
        if value == 1:  # the user presses Cancel after the first step
            calls["at_interrupt"] = calls["unet"]
            comfy.mm.interrupt_current_processing(True)

    monkeypatch.setattr(unet, "forward", counting_forward)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.mm.InterruptProcessingException):
            comfy.nodes["MVDPP_MultiViewSampler"].execute(loaded, sampled.cond, 7, 10, "ddim", 1.0)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.mm.interrupt_current_processing(False)
    assert calls["at_interrupt"] == 1
    assert calls["unet"] - calls["at_interrupt"] <= 1  # at most the step already under way


# --- ViewGrid --------------------------------------------------------------------------------


def numbered_views(h: int = 4, w: int = 6) -> torch.Tensor:
    """IMAGE [32, h, w, 3] whose view i is the constant i / 31."""
    return (torch.arange(32).float() / 31).view(32, 1, 1, 1).expand(32, h, w, 3).contiguous()


def test_grid_rows_are_elevations_and_columns_azimuths(comfy):
    node = comfy.nodes["MVDPP_ViewGrid"]
    (grid,) = node.execute(numbered_views(), "grid", "0", "", "#FFFFFF").args
    assert grid.shape == (1, 4 * 4, 8 * 6, 3)
    for e in range(4):
        for a in range(8):
            block = grid[0, e * 4:(e + 1) * 4, a * 6:(a + 1) * 6]
            torch.testing.assert_close(block, torch.full_like(block, (e * 8 + a) / 31))


def test_grid_picks_rows_and_views_and_composites_masks(comfy):
    node = comfy.nodes["MVDPP_ViewGrid"]
    views = numbered_views()
    (row,) = node.execute(views, "elevation row", "30", "", "#FFFFFF").args
    torch.testing.assert_close(row, views[16:24])
    (picked,) = node.execute(views, "views", "0", "31, 8, 1-2", "#FFFFFF").args
    torch.testing.assert_close(picked, views[[31, 8, 1, 2]])
    masks = torch.zeros(32, 4, 6)
    masks[:, :, :3] = 1
    (grid,) = node.execute(views, "grid", "0", "", "#FF0000", masks).args
    torch.testing.assert_close(grid[0, 0, 3], torch.tensor([1.0, 0.0, 0.0]))  # background: red
    torch.testing.assert_close(grid[0, 0, 0], torch.zeros(3))  # object: view 0's value


def test_grid_errors_name_the_problem_and_the_fix(comfy):
    node = comfy.nodes["MVDPP_ViewGrid"]
    views = numbered_views()
    with pytest.raises(ValueError, match="needs all 32 views"):
        node.execute(views[:31], "grid", "0", "", "#FFFFFF")
    with pytest.raises(ValueError, match="cannot read view index 'abc'.*e.g. '0, 8, 16-19'"):
        node.execute(views, "views", "0", "1, abc", "#FFFFFF")
    with pytest.raises(ValueError, match="view indices \\[40\\] are outside the rig; allowed 0 to 31"):
        node.execute(views, "views", "0", "40", "#FFFFFF")
    with pytest.raises(ValueError, match="runs backwards"):
        node.execute(views, "views", "0", "5-2", "#FFFFFF")
    with pytest.raises(ValueError, match="'red' is not a hex colour; write it as '#RRGGBB'"):
        node.execute(views, "grid", "0", "", "red", torch.ones(32, 4, 6))
    with pytest.raises(ValueError, match="do not match images.*connect the MASK output"):
        node.execute(views, "grid", "0", "", "#FFFFFF", torch.ones(32, 5, 6))
    with pytest.raises(ValueError, match="elevation 45 deg is not on the rig"):
        node.execute(views, "elevation row", "45", "", "#FFFFFF")


# --- queue-time validation -----------------------------------------------------------------
# ComfyUI 0.3.75 checks neither V3 option lists nor NaN, and skips its min / max check for
# inputs a node's validate_inputs names: every value below must be refused there.

BAD_WIDGETS = [
    ("MVDPP_LoadModel", {"checkpoint": "tiny.safetensors", "device": "gpu"}, ["device 'gpu'", "'auto', 'cpu'"]),
    ("MVDPP_LoadModel", {"checkpoint": "tiny.safetensors", "dtype": "float16"}, ["dtype 'float16'", "'bf16'"]),
    ("MVDPP_LoadModel", {"checkpoint": "tiny.safetensors", "attention": "flash"}, ["attention 'flash'", "'sdpa'"]),
    ("MVDPP_MaskAwareEncode", {"mask_convention": "inverted"}, ["mask_convention 'inverted'", "foreground=1"]),
    ("MVDPP_MultiViewSampler", {"sampler": "euler", "cfg": 3.0}, ["sampler 'euler'", "'dpmpp_2m'"]),
    ("MVDPP_MultiViewSampler", {"sampler": "ddim", "cfg": math.nan}, ["cfg=nan is not a finite number", "1.0 to 20.0"]),
    ("MVDPP_MultiViewSampler", {"sampler": "ddim", "cfg": math.inf}, ["cfg=inf is not a finite number"]),
    ("MVDPP_MultiViewSampler", {"sampler": "ddim", "cfg": 0.5}, ["cfg=0.5 is outside the allowed range 1.0 to 20.0"]),
    ("MVDPP_ViewGrid", {"mode": "views", "indices": "1, abc"}, ["cannot read view index 'abc'", "16-19"]),
    ("MVDPP_ViewGrid", {"mode": "views", "indices": "3, 32"}, ["view indices [32] are outside the rig"]),
    ("MVDPP_ViewGrid", {"mode": "grid", "background": "red"}, ["'red' is not a hex colour", "'#RRGGBB'"]),
    ("MVDPP_ViewGrid", {"mode": "tiles"}, ["mode 'tiles' is not one of", "'elevation row'"]),
    ("MVDPP_ViewGrid", {"mode": "elevation row", "elevation": "45"}, ["elevation '45' is not one of"]),
    ("MVDPP_MeshExport", {"filename_prefix": "mvdpp/me\x00sh"}, ["control character", "'\\x00'", "remove"]),
    ("MVDPP_MeshExport", {"filename_prefix": "mvdpp/" + "m" * 300}, ["300 bytes", "255 per name", "at most 239"]),
    ("MVDPP_MeshExport", {"filename_prefix": "a/" * 600}, ["1200 bytes long; give at most 1024"]),
    ("MVDPP_MeshExport", {"method": "best"}, ["method 'best' is not one of ['fast', 'quality']"]),
    ("MVDPP_MeshExport", {"format": "stl"}, ["format 'stl' is not one of ['glb', 'obj', 'ply']"]),
]


@pytest.mark.parametrize(("node_id", "values", "fragments"), BAD_WIDGETS, ids=lambda v: str(v)[:40])
def test_bad_widget_values_are_refused_at_queue_time(comfy, loaded, node_id, values, fragments):
    message = comfy.nodes[node_id].validate_inputs(**values)
    assert isinstance(message, str), f"{node_id} accepted {values}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


GOOD_WIDGETS = [
    ("MVDPP_LoadModel", {"checkpoint": "tiny.safetensors", "device": "cpu", "dtype": "bf16", "attention": "sdpa"}),
    ("MVDPP_MultiViewSampler", {"sampler": "dpmpp_2m", "cfg": 1.0}),
    ("MVDPP_MultiViewSampler", {"sampler": None, "cfg": None}),  # linked from other nodes: checked at run time
    ("MVDPP_ViewGrid", {"mode": "grid", "elevation": "60", "indices": "unused in grid", "background": "#0a0B0c"}),
    ("MVDPP_ViewGrid", {"mode": "views", "indices": "0, 8, 16-19"}),
    ("MVDPP_MeshExport", {"filename_prefix": "mvdpp/" + "m" * 239, "method": "quality", "format": "ply"}),
    ("MVDPP_MaskAwareEncode", {"mask_convention": "alpha-inverted (LoadImage MASK)"}),
]


@pytest.mark.parametrize(("node_id", "values"), GOOD_WIDGETS, ids=lambda v: str(v)[:40])
def test_good_widget_values_pass_queue_time_validation(comfy, loaded, node_id, values):
    assert comfy.nodes[node_id].validate_inputs(**values) is True


# --- MeshExport ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["../escape", "a/../../b", "/tmp/abs", "..\\win", "C:\\x\\mesh", "  "])
def test_mesh_prefix_outside_output_folder_is_refused(comfy, prefix):
    node = comfy.nodes["MVDPP_MeshExport"]
    message = node.validate_inputs(prefix)
    assert isinstance(message, str) and ("outside ComfyUI's output folder" in message or "is empty" in message)
    with pytest.raises(ValueError, match="output folder|is empty"):
        comfy.pack.nodes.mesh.output_path(prefix, "glb")


def test_mesh_prefix_subfolders_stay_inside(comfy):
    assert comfy.nodes["MVDPP_MeshExport"].validate_inputs("mvdpp/sub/mesh") is True
    path, subfolder, filename = comfy.pack.nodes.mesh.output_path("mvdpp/sub/mesh", "obj")
    output = Path(comfy.folder_paths.get_output_directory()).resolve()
    assert path.resolve().parent == output / "mvdpp" / "sub" and subfolder == "mvdpp/sub"
    assert filename == "mesh_00001_.obj"


def test_mesh_symlink_out_of_the_output_folder_is_refused_before_any_folder_is_made(comfy, tmp_path):
    output = Path(comfy.folder_paths.get_output_directory())
    (output / "sneaky").symlink_to(tmp_path, target_is_directory=True)
    try:
        with pytest.raises(ValueError, match="outside the output folder"):
            comfy.pack.nodes.mesh.output_path("sneaky/mesh", "glb")
        with pytest.raises(ValueError, match="outside the output folder"):
            comfy.pack.nodes.mesh.output_path("sneaky/deeper/mesh", "glb")
        assert list(tmp_path.iterdir()) == []  # ComfyUI's makedirs never ran for the refused prefix
    finally:
        (output / "sneaky").unlink()


def test_longest_allowed_prefix_writes_a_file(comfy):
    """The length limit is no stricter than the file system: a 239-byte name part saves."""
    path, _, filename = comfy.pack.nodes.mesh.output_path("tests/" + "m" * 239, "glb")
    path.write_bytes(b"ok")
    assert path.read_bytes() == b"ok" and len(filename.encode()) <= 255


def rig_sphere_views(
    size: int = 48, radius: float = 0.35, two_tone: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [32, s, s, 3] and MASK [32, s, s] of a sphere seen from the 32 rig cameras (exact
    ray-sphere intersection, so this test does not depend on the renderer); grey, or with
    ``two_tone`` red above its equator (world +Z) and blue below."""
    from mvdpp_core import cameras

    origins, dirs = cameras.pixel_rays(cameras.rig_c2w(torch.float64), cameras.intrinsics(size), size, size)
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius**2
    hit = (b * b - c > 0).float()
    views = (0.2 + 0.6 * hit)[..., None].expand(-1, -1, -1, 3).float().contiguous()
    if two_tone:
        depth = -b - (b * b - c).clamp(min=0).sqrt()
        above = (origins + depth[..., None] * dirs)[..., 2] > 0
        tone = torch.where(above[..., None], torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9]))
        views = torch.where(hit[..., None] > 0, tone, torch.ones(3)).float().contiguous()
    return views, hit.float()


def test_mesh_export_saves_inside_output_and_gives_a_y_up_mesh(comfy):
    import trimesh

    views, masks = rig_sphere_views()
    calls: list[tuple[int, int]] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        out = comfy.nodes["MVDPP_MeshExport"].execute(views, masks, "fast", 48, "ply", "tests/sphere")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    mesh, relative = out.args
    assert relative == "tests/sphere_00001_.ply"
    assert out.ui == {"3d": [{"filename": "sphere_00001_.ply", "subfolder": "tests", "type": "output"}]}
    saved = trimesh.load(Path(comfy.folder_paths.get_output_directory()) / relative, force="mesh")
    assert len(saved.faces) > 100
    assert mesh.vertices.shape[0] == 1 and mesh.vertices.shape[2] == 3 and mesh.faces.shape[2] == 3
    assert mesh.faces.dtype == torch.int64 and int(mesh.faces.max()) < mesh.vertices.shape[1]
    radii = mesh.vertices[0].norm(dim=-1)
    assert abs(radii.mean().item() - 0.35) < 0.06  # the sphere, not a box around it
    assert calls and calls[-1][0] == calls[-1][1]  # progress reached the end
    # Z up -> Y up: the saved PLY (our frame) and the MESH differ by that rotation.
    v = torch.as_tensor(saved.vertices, dtype=torch.float32)
    assert math.isclose(v[:, 2].max().item(), mesh.vertices[0, :, 1].max().item(), abs_tol=1e-4)
    assert math.isclose(v[:, 1].max().item(), -mesh.vertices[0, :, 2].min().item(), abs_tol=1e-4)


def test_mesh_export_takes_the_extent_from_the_masks_not_from_colours_outside_them(comfy):
    """Views whose colours show a larger sphere than their masks (as an average of estimates
    that disagree at the rims does) give the masks' sphere: the node reads the views on white
    through their masks, as MultiViewResult.for_reconstruction hands them over. Read as they
    are, the colour snap grows the radius to 0.42."""
    big, _ = rig_sphere_views(radius=0.42)
    _, masks = rig_sphere_views(radius=0.35)
    mesh, _ = comfy.nodes["MVDPP_MeshExport"].execute(big, masks, "fast", 48, "ply", "tests/rims").args
    assert abs(mesh.vertices[0].norm(dim=-1).mean().item() - 0.35) < 0.02


def test_mesh_export_refuses_inverted_masks_before_writing(comfy):
    views, masks = rig_sphere_views()
    with pytest.raises(ValueError, match="masks of 32 views.*look inverted.*InvertMask"):
        comfy.nodes["MVDPP_MeshExport"].execute(views, 1 - masks, "fast", 48, "glb", "tests/inverted")
    assert not list(Path(comfy.folder_paths.get_output_directory()).glob("tests/inverted*"))
    # up to 2 bad views are what reconstruct drops as outliers: still a sphere
    few = masks.clone()
    few[[3, 17]] = 1 - few[[3, 17]]
    mesh, _ = comfy.nodes["MVDPP_MeshExport"].execute(views, few, "fast", 48, "ply", "tests/two_bad").args
    assert abs(mesh.vertices[0].norm(dim=-1).mean().item() - 0.35) < 0.06


def test_mesh_output_tooltip_says_save_glb_has_no_colours(comfy):
    outputs = {o.display_name: o.tooltip for o in comfy.nodes["MVDPP_MeshExport"].GET_SCHEMA().outputs}
    assert "Save GLB" in outputs["mesh"] and "no colours" in outputs["mesh"] and "Preview 3D" in outputs["mesh"]
    assert "colours" in outputs["path"] and "Preview 3D" in outputs["path"]


def test_mesh_export_cancel_stops_reconstruction(comfy):
    views, masks = rig_sphere_views(32)
    seen: list[int] = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        comfy.mm.interrupt_current_processing(True)  # Cancel at the first progress report

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.mm.InterruptProcessingException):
            comfy.nodes["MVDPP_MeshExport"].execute(views, masks, "fast", 32, "glb", "tests/cancelled")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.mm.interrupt_current_processing(False)
    assert len(seen) == 1
    assert not list(Path(comfy.folder_paths.get_output_directory()).glob("tests/cancelled*"))


def test_comfy_mesh_is_y_up_like_the_glb_file(comfy):
    from mvdpp_core.reconstruction import ReconstructedMesh

    vertices = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)  # +Z, +Y, +X in our frame
    colours = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    mesh = comfy.pack.nodes.mesh.to_comfy_mesh(ReconstructedMesh(vertices, np.array([[0, 1, 2]]), colours))
    expected = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]])  # up is +Y in glTF
    torch.testing.assert_close(mesh.vertices, expected)
    assert mesh.faces.tolist() == [[[0, 1, 2]]]
    # ComfyUI 0.3.75's MESH is geometry only: the node says so and hands over no colours.
    assert not comfy.pack.nodes.mesh.mesh_takes_colours()
    assert getattr(mesh, "vertex_colors", None) is None


class NewerMesh:
    """The MESH constructor of later ComfyUI releases, 0.38's (comfy_api/latest/_util/
    geometry_types.py): geometry plus optional colours, UVs, texture and normals, which core
    Save GLB writes into the file as given (COLOR_0, NORMAL)."""

    def __init__(self, vertices, faces, uvs=None, vertex_colors=None, texture=None, metallic_roughness=None,
                 vertex_counts=None, face_counts=None, unlit=False, normals=None, tangents=None, normal_map=None,
                 occlusion_in_mr=False, material=None, emissive=None):
        self.vertices, self.faces, self.vertex_colors, self.normals = vertices, faces, vertex_colors, normals
        self.uvs, self.texture = uvs, texture


def test_mesh_export_hands_colours_and_normals_to_a_mesh_type_that_takes_them(comfy, monkeypatch):
    """Under a newer ComfyUI, whose MESH carries vertex colours and normals, the MESH output is
    the saved file's mesh with its colours (so core Save GLB writes it coloured) and outward
    normals in the same +Y-up frame; the tooltip stops calling it geometry only."""
    import trimesh

    monkeypatch.setattr(comfy.pack.nodes.mesh, "MESH", NewerMesh)
    assert comfy.pack.nodes.mesh.mesh_takes_colours()
    outputs = {o.display_name: o.tooltip for o in comfy.nodes["MVDPP_MeshExport"].GET_SCHEMA().outputs}
    assert "vertex colours" in outputs["mesh"] and "no colours" not in outputs["mesh"]

    views, masks = rig_sphere_views(two_tone=True)  # red above the equator, blue below
    mesh, relative = comfy.nodes["MVDPP_MeshExport"].execute(views, masks, "fast", 48, "ply", "tests/coloured").args
    saved = trimesh.load(Path(comfy.folder_paths.get_output_directory()) / relative, force="mesh", process=False)
    assert mesh.vertex_colors.shape == mesh.vertices.shape and mesh.vertex_colors.dtype == torch.float32
    torch.testing.assert_close(  # the file's uint8 colours, vertex for vertex
        mesh.vertex_colors[0], torch.as_tensor(saved.visual.vertex_colors[:, :3] / 255.0, dtype=torch.float32),
        atol=0.5 / 255 + 1e-6, rtol=0,
    )
    up = mesh.vertices[0, :, 1]  # glTF's up
    top, bottom = mesh.vertex_colors[0][up > 0.1].mean(0), mesh.vertex_colors[0][up < -0.1].mean(0)
    # red on top, blue below: what a mix-up of frames, vertex order or channels would break
    assert top[0] > 3 * top[2] and bottom[2] > 3 * bottom[0]
    normals = mesh.normals[0]
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(len(normals)), atol=1e-4, rtol=0)
    radial = mesh.vertices[0] / mesh.vertices[0].norm(dim=-1, keepdim=True)
    assert (normals * radial).sum(-1).mean() > 0.95  # a sphere's normals point out along its radius


def test_node_search_aliases_reach_a_schema_that_takes_them(comfy, monkeypatch):
    """Later ComfyUI releases (0.38's Schema) take ``search_aliases``, the other words their node
    search finds a node by: every node of the pack hands its own there, naming the model and what
    it does. 0.3.75's Schema has no such field and would refuse the keyword, so there the
    aliases are left out and the schema builds as before."""
    import dataclasses

    io = comfy.pack.nodes._comfy.io
    assert "search_aliases" not in {f.name for f in dataclasses.fields(io.Schema)}  # the tested ComfyUI
    real = {node_id: node.GET_SCHEMA() for node_id, node in comfy.nodes.items()}
    assert all(type(s) is io.Schema for s in real.values())

    @dataclasses.dataclass
    class NewerSchema(io.Schema):
        search_aliases: list[str] = dataclasses.field(default_factory=list)

    monkeypatch.setattr(io, "Schema", NewerSchema)
    for node_id, node in comfy.nodes.items():
        newer = node.GET_SCHEMA()
        assert type(newer) is NewerSchema, node_id
        aliases = newer.search_aliases
        assert "mvdiffusion" in aliases and len(aliases) == len(set(aliases)) >= 4, (node_id, aliases)
        assert all(a == a.strip().lower() and a for a in aliases), (node_id, aliases)
        # nothing else of the schema changes
        assert [i.id for i in newer.inputs] == [i.id for i in real[node_id].inputs], node_id
        assert newer.display_name == real[node_id].display_name, node_id
    sampler = comfy.nodes["MVDPP_MultiViewSampler"].GET_SCHEMA().search_aliases
    mesh = comfy.nodes["MVDPP_MeshExport"].GET_SCHEMA().search_aliases
    assert "image to 3d" in sampler and {"mesh", "glb"} <= set(mesh)


def test_pack_never_imports_comfy_api_outside_one_module():
    from comfyui_harness import REPO

    importers = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "nodes").rglob("*.py")
        if "comfy_api" in p.read_text() or "import folder_paths" in p.read_text()
    ]
    assert importers == ["nodes/_comfy.py"]
    core = [p.name for p in (REPO / "mvdpp_core").rglob("*.py") if "import comfy" in p.read_text()]
    assert core == []


def test_loading_the_pack_imports_nothing_heavy(comfyui_dir):
    """ComfyUI imports every pack at start-up: ours must not pull diffusers, trimesh or a model."""
    import os
    import subprocess
    import sys

    from comfyui_harness import REPO

    script = (
        "import asyncio, sys\n"
        "from comfyui_harness import import_comfyui, load_pack, comfyui_path\n"
        "import_comfyui(comfyui_path())\n"
        "asyncio.run(asyncio.run(load_pack().comfy_entrypoint()).get_node_list())\n"
        "print(sorted(m for m in ('diffusers', 'transformers', 'trimesh', 'scipy', 'kornia') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "MVDPP_COMFYUI": str(comfyui_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_sampler_node_defaults_are_the_general_sampling(comfy):
    """A fresh sampler node samples as the demo and batch generation sample a checkpoint that is not
    of the default recipe (the shipped workflows set the embedded default's sampling)."""
    from mvdpp_core.sampling_defaults import CHECKPOINT_SAMPLING

    inputs = {i.id: i for i in comfy.nodes["MVDPP_MultiViewSampler"].GET_SCHEMA().inputs}
    defaults = tuple(inputs[name].default for name in ("sampler", "steps", "cfg", "mirror_average", "average_seeds",
                                                        "input_average"))
    assert defaults == CHECKPOINT_SAMPLING


def test_a_recipe_model_sampled_unlike_its_workflows_is_warned_about(comfy, loaded, sampled, model_dir, caplog):
    """The loader tells a model of the default recipe (the embedded default, by its metadata) from any
    other; the sampler warns on the console when such a model gets a sampler under which its views
    disagree, and says nothing under its workflows' 2 ddim steps or for any other model."""
    import logging

    embedded = comfy.nodes["MVDPP_LoadModel"].execute("mvdpp_default.safetensors", "cpu", "auto", "auto")[0]
    assert embedded.recipe and not loaded.recipe
    # the embedded default comes with its partner, whose estimates the sampler averages with its own
    (partner,) = embedded.partners
    assert embedded.models == (embedded.model, partner) and partner is not embedded.model
    assert not loaded.partners and loaded.models is loaded.model
    recipe = comfy.pack.nodes.loader.LoadedModel(loaded.model, "mvdpp_default.safetensors", recipe=True)
    node = comfy.nodes["MVDPP_MultiViewSampler"]
    with caplog.at_level(logging.WARNING):
        node.execute(recipe, sampled.cond, 7, 2, "ddim", 2.0)
        node.execute(loaded, sampled.cond, 7, 3, "dpmpp_2m", 2.0)
        assert not caplog.records
        node.execute(recipe, sampled.cond, 7, 3, "dpmpp_2m", 2.0)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "mvdpp_default.safetensors is a model of the default procedural recipe" in record.getMessage()
    assert "With 3 dpmpp_2m steps they will disagree" in record.getMessage()
