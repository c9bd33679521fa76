"""The object-folder format, shards, the training dataset (determinism, rank split, resume,
broken files) and the render launcher (resume, failure log, SLURM script)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial.transform import Rotation

from mvdpp_core import cameras as cam
from mvdpp_core.common import composite_on_white
from mvdpp_core.reconstruction.metrics import IOU_RESOLUTION, bounding_surface_samples, occupancy, winding_numbers
from mvdpp_core.reconstruction.render import render_trimesh
from train.data import format as fmt
from train.data.dataset import MultiViewDataset, ViewSampling, first_object, make_batches, to_tensors
from train.data.shards import object_folders, pack_shards
from train.data.synthetic import synthetic_object, write_synthetic_dataset
from train.procedural.objects import Split, build_part, object_seed, procedural_object, sample_parts, upright
from train.procedural.render import AMBIENT, ANTIALIAS, LIGHT_DIR, render_object, render_views
from train.render.launch import RenderJob, RenderOptions, read_object_list, render_all, slurm_script


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects")
    write_synthetic_dataset(root, num_objects=5, image_size=32, num_cond=4, seed=3)
    return root


def test_folder_round_trip_and_camera_schema(tmp_path):
    targets, conds, cameras = synthetic_object(seed=7, image_size=32, num_cond=3)
    folder = fmt.write_object_folder(tmp_path / "obj", targets, conds, cameras)
    views = fmt.read_object_folder(folder)
    np.testing.assert_array_equal(views.target_rgba, targets)
    np.testing.assert_array_equal(views.cond_rgba, conds)
    doc = views.cameras
    np.testing.assert_allclose(np.array([v["c2w"] for v in doc["targets"]]), cam.rig_c2w(torch.float64).numpy())
    np.testing.assert_allclose(doc["K"], cam.intrinsics(32).numpy())
    first = doc["conditions"][0]
    assert first["azimuth_deg"] == 0.0 and -10 <= first["elevation_deg"] <= 45 and 1.5 <= first["distance"] <= 2.2
    some = fmt.read_object_folder(folder, target_ids=[3, 30], cond_ids=[2])
    np.testing.assert_array_equal(some.target_rgba, targets[[3, 30]])
    np.testing.assert_array_equal(some.cond_rgba, conds[[2]])


def test_writer_rejects_bad_input_and_completeness_needs_every_file(tmp_path):
    targets, conds, cameras = synthetic_object(seed=1, image_size=16, num_cond=2)
    with pytest.raises(ValueError, match="target_rgba has 31 views; the rig has 32"):
        fmt.write_object_folder(tmp_path / "a", targets[:31], conds, cameras)
    with pytest.raises(ValueError, match="cond_rgba has 1 views but cameras lists 2"):
        fmt.write_object_folder(tmp_path / "a", targets, conds[:1], cameras)
    folder = fmt.write_object_folder(tmp_path / "b", targets, conds, cameras)
    assert fmt.is_complete(folder)
    (folder / "cond_01.png").unlink()
    assert not fmt.is_complete(folder)
    with pytest.raises(fmt.ObjectReadError, match="cond_01.png is missing"):
        fmt.read_object_folder(folder)


def sampling() -> ViewSampling:
    return ViewSampling(num_targets=8, single_view_prob=0.5, max_cond_views=4)


def items(ds: MultiViewDataset, n: int) -> list[dict]:
    return list(itertools.islice(iter(ds), n))


def test_items_have_the_requested_views_and_batches_share_k(objects):
    ds = MultiViewDataset(folders=str(objects), image_size=16, sampling=sampling(), batch_size=2, seed=0)
    got = items(ds, 12)
    for batch in (got[i : i + 2] for i in range(0, 12, 2)):
        assert len({b["cond_rgb"].shape[0] for b in batch}) == 1  # one k per batch (it stacks)
    for it in got:
        assert it["target_rgb"].shape == (8, 3, 16, 16) and it["target_mask"].shape == (8, 1, 16, 16)
        assert it["target_ids"].tolist() == sorted(set(it["target_ids"].tolist()))
        assert it["target_rgb"].min() >= 0 and it["target_rgb"].max() <= 1
    assert {it["cond_rgb"].shape[0] for it in got} != {1}  # stage-3 style sampling draws k > 1 too


def test_rank_split_covers_the_same_samples_as_one_process(objects):
    one = items(MultiViewDataset(folders=str(objects), image_size=16, sampling=sampling(), batch_size=4, seed=0), 8)
    ranks = [
        items(
            MultiViewDataset(
                folders=str(objects), image_size=16, sampling=sampling(), batch_size=2, seed=0, rank=r, world_size=2
            ),
            4,
        )
        for r in range(2)
    ]
    for step in range(2):
        single = {it["sample_seed"] for it in one[4 * step : 4 * step + 4]}
        split = {it["sample_seed"] for r in range(2) for it in ranks[r][2 * step : 2 * step + 2]}
        assert single == split


def test_workers_and_resume_keep_the_order(objects):
    def seeds(batches, n):
        return [s for b in itertools.islice(batches, n) for s in b["sample_seed"].tolist()]

    make = lambda start: MultiViewDataset(
        folders=str(objects), image_size=16, sampling=sampling(), batch_size=2, seed=0, start_batch=start
    )
    reference = seeds(make_batches(make(0)), 6)
    assert seeds(make_batches(make(0), num_workers=2), 6) == reference
    assert seeds(make_batches(make(3)), 3) == reference[6:]


def test_joined_data_folders_draw_from_each(objects, tmp_path):
    """'::' joins data folders (two renders whose object folders share names, as the procedural
    objects with and without --upright do): every folder of each is listed, root by root, the
    dataset draws objects of both, and a missing one is named."""
    other = tmp_path / "other"
    write_synthetic_dataset(other, num_objects=3, image_size=32, num_cond=4, seed=4)
    joined = f"{objects}::{other}"
    listed = object_folders(joined)
    assert listed == object_folders(objects) + object_folders(other)
    assert len({p.name for p in listed}) < len(listed) == 8  # the same names, each kept
    ds = MultiViewDataset(folders=joined, image_size=16, sampling=sampling(), batch_size=2, seed=0)
    assert ds.folders == listed

    def source(item: dict) -> Path:
        for folder in listed:
            views = to_tensors(fmt.read_object_folder(folder).target_rgba[item["target_ids"].numpy()], 16)[0]
            if torch.equal(views, item["target_rgb"]):
                return folder.parent
        raise AssertionError("an item that matches no listed object")

    assert {source(it) for it in items(ds, 16)} == {objects, other}
    with pytest.raises(ValueError, match=r"data folder .*missing \(one of the '::'-joined"):
        object_folders(f"{objects}::{tmp_path / 'missing'}")


def test_shards_stream_the_same_objects_and_resume(objects, tmp_path):
    counts = pack_shards(object_folders(objects), str(tmp_path / "s-%06d.tar"), per_shard=2)
    assert counts == {"packed": 5, "skipped": 0, "shards": 3}
    spec = str(tmp_path / "s-{000000..000002}.tar")
    from_shard, from_folder = first_object(shards=spec), first_object(folders=str(objects))
    np.testing.assert_array_equal(from_shard.target_rgba, from_folder.target_rgba)
    make = lambda start: MultiViewDataset(
        shards=spec, image_size=16, sampling=sampling(), batch_size=2, seed=0, start_batch=start
    )
    full = items(make(0), 10)
    resumed = items(make(2), 6)
    for a, b in zip(full[4:], resumed, strict=True):
        torch.testing.assert_close(a["target_rgb"], b["target_rgb"])
        assert a["sample_seed"] == b["sample_seed"]


def test_broken_objects_are_replaced_and_counted(tmp_path, caplog):
    folders = write_synthetic_dataset(tmp_path, num_objects=3, image_size=16, num_cond=2, seed=4)
    (folders[2] / "cameras.json").write_text("{ not json")
    caplog.set_level("WARNING")
    ds = MultiViewDataset(folders=str(tmp_path), image_size=16, sampling=ViewSampling(), batch_size=1, seed=0)
    got = items(ds, 6)  # two epochs over 3 objects: the broken one is met at least twice
    warnings = caplog.text.count("skipping object obj_000002")
    assert sum(it["skipped"] for it in got) == warnings >= 2  # every skip is counted and logged
    assert "not valid JSON" in caplog.text


def test_launcher_resumes_logs_failures_and_writes_slurm(objects, tmp_path):
    listing = tmp_path / "objects.csv"
    listing.write_text("uid,path\nobj_000000,a.glb\nbroken,b.glb\n")
    jobs = read_object_list(listing)
    assert [j.uid for j in jobs] == ["obj_000000", "broken"] and jobs[1].path == tmp_path / "b.glb"
    out = tmp_path / "renders"
    out.mkdir()
    (out / "obj_000000").symlink_to(objects / "obj_000000", target_is_directory=True)  # already rendered
    options = RenderOptions(out=out, resolution=16, num_cond=2, blender="/bin/false")  # every render "fails"
    assert render_all(jobs, options) == {"done": 0, "skipped": 1, "failed": 1}
    failure = json.loads((out / "_failures.jsonl").read_text().splitlines()[0])
    assert failure["uid"] == "broken" and failure["returncode"] == 1
    script = slurm_script(listing, options, array=4, workers=2)
    assert "#SBATCH --array=0-3" in script and "--slice $SLURM_ARRAY_TASK_ID" in script and "--num-slices 4" in script
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,path\n../escape,x.glb\n")
    with pytest.raises(ValueError, match="uid '../escape' is not a safe folder name"):
        read_object_list(bad)
    assert RenderJob("x", Path("y")).uid == "x"


@pytest.mark.parametrize("broken", [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [0, 2, 3, 4, 5]])
def test_the_one_readable_object_is_found_whatever_the_epoch_order(tmp_path, broken):
    """With 5 of 6 objects broken, every sample falls back to the intact one (the fallback
    stays inside one epoch's ordering, which holds every object once)."""
    folders = write_synthetic_dataset(tmp_path, num_objects=6, image_size=16, num_cond=1, seed=5)
    for i in broken:
        (folders[i] / "cameras.json").write_text("{ not json")
    intact = next(i for i in range(6) if i not in broken)
    ds = MultiViewDataset(folders=str(tmp_path), image_size=16, sampling=ViewSampling(), batch_size=1, seed=0)
    got = items(ds, 12)  # two epochs
    cond_rgb, _ = to_tensors(fmt.read_object_folder(folders[intact], cond_ids=[0]).cond_rgba, 16)
    assert sum(it["skipped"] > 0 for it in got) >= 10  # all but the intact object's own draws fell back
    for it in got:
        torch.testing.assert_close(it["cond_rgb"][0], cond_rgb[0])  # ... to the intact object


def test_front_input_copy_puts_rig_view_8_first_and_keeps_the_rest(objects, tmp_path):
    from train.procedural.front_input import main as front_input

    out = tmp_path / "front"
    assert front_input(["--src", str(objects), "--out", str(out)]) == 0
    for folder in sorted(objects.iterdir()):
        source, copy = fmt.read_object_folder(folder), fmt.read_object_folder(out / folder.name)
        np.testing.assert_array_equal(copy.cond_rgba[0], source.target_rgba[8])  # the input is the front view
        np.testing.assert_array_equal(copy.cond_rgba[1:], source.cond_rgba[1:])
        np.testing.assert_array_equal(copy.target_rgba, source.target_rgba)
        first = copy.cameras["conditions"][0]
        assert (first["azimuth_deg"], first["elevation_deg"], first["file"]) == (0.0, 0.0, "cond_00.png")
        assert first["c2w"] == source.cameras["targets"][8]["c2w"]
        assert not (folder / "cond_00.png").samefile(out / folder.name / "cond_00.png")
    assert front_input(["--src", str(objects), "--out", str(out)]) == 0  # a second run keeps the copies
    with pytest.raises(SystemExit, match="inside --src"):
        front_input(["--src", str(objects), "--out", str(objects / "front")])


def test_procedural_views_store_straight_colour_so_one_composite_gives_the_render_on_white():
    """The renderer until 2026-12-05 stored colour already on white, and readers composited it
    again (a^2 c + 1 - a^2 on every antialiased outline): off by up to 0.22 here."""
    mesh, _, _ = procedural_object(Split.HELDOUT, 0)
    c2w, K = cam.rig_c2w()[:4], cam.intrinsics(64)
    rgba = torch.from_numpy(render_views(mesh, c2w, K, 64)).float() / 255  # v S S 4
    on_white = render_trimesh(mesh, c2w, K, 64, background=1.0, light_dir=torch.tensor(LIGHT_DIR),
                              ambient=AMBIENT, antialias=ANTIALIAS).rgb
    alpha = rgba[..., 3:]
    partly = ((alpha > 0.1) & (alpha < 0.9)).expand_as(on_white)
    assert partly.float().mean() > 0.005, "the views must have antialiased outlines for this to test"
    torch.testing.assert_close(composite_on_white(rgba[..., :3], alpha)[partly], on_white[partly], atol=2 / 255, rtol=0)


def test_the_legacy_renderer_stores_what_one_composite_of_the_straight_views_gives():
    """``on_white`` (the embedded default's steps 1-5 trained on it) keeps the old stored colour:
    the straight views composited on white once, with the same coverage."""
    mesh, _, _ = procedural_object(Split.HELDOUT, 4)
    c2w, K = cam.rig_c2w()[8:12], cam.intrinsics(64)
    straight = torch.from_numpy(render_views(mesh, c2w, K, 64)).float() / 255
    legacy = torch.from_numpy(render_views(mesh, c2w, K, 64, on_white=True)).float() / 255
    torch.testing.assert_close(legacy[..., 3], straight[..., 3], atol=0, rtol=0)
    torch.testing.assert_close(legacy[..., :3], composite_on_white(straight[..., :3], straight[..., 3:]),
                               atol=1.01 / 255, rtol=0)
    assert (legacy[..., :3] - straight[..., :3]).abs().max() > 0.1  # the two conventions do differ


def test_a_procedural_object_s_occupancy_is_the_union_of_its_parts():
    """Later parts overlap the first by design, and the object is their concatenation: the volume
    IoU's occupancy of the object must be the union of each part's (ray parity emptied the
    overlaps: held-out object 6 counted 35152 of its 54174 cells)."""
    parts = sample_parts(object_seed(Split.HELDOUT, 6))
    mesh, center, scale = procedural_object(Split.HELDOUT, 6)
    lo, hi = mesh.bounds
    union = np.zeros((IOU_RESOLUTION,) * 3, bool)
    for part in parts:
        part_mesh = build_part(part)
        union |= occupancy(trimesh.Trimesh((part_mesh.vertices - center) * scale, part_mesh.faces), lo, hi)
    assert len(parts) == 2 and union.sum() == 54174
    np.testing.assert_array_equal(occupancy(mesh, lo, hi), union)


def _solid_angle_winding(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """The generalised winding number, brute force: every face's solid angle seen from each point, over 4 pi."""
    tris = np.asarray(mesh.vertices)[np.asarray(mesh.faces)]
    out = []
    for chunk in np.array_split(points, max(1, len(points) // 100)):
        a, b, c = np.moveaxis(tris[None] - chunk[:, None, None], 2, 0)  # corner: n f xyz
        la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
        den = la * lb * lc + (a * b).sum(-1) * lc + (a * c).sum(-1) * lb + (b * c).sum(-1) * la
        out.append(np.arctan2((a * np.cross(b, c)).sum(-1), den).sum(-1) / (2 * np.pi))
    return np.concatenate(out)


def test_a_procedural_object_s_chamfer_samples_lie_on_its_union_s_surface():
    """Held-out object 6's two parts overlap. Its winding numbers by binned rays equal the solid
    angles' (0, 1 or 2 parts deep) just off each side of surface samples and at random points; the
    Chamfer samples are exactly the surface samples whose two sides differ in being held."""
    mesh, _, _ = procedural_object(Split.HELDOUT, 6)
    points, face = trimesh.sample.sample_surface(mesh, 400, seed=0)
    step = 1e-6 * np.linalg.norm(mesh.extents) * mesh.face_normals[face]
    scattered = np.random.default_rng(0).uniform(*mesh.bounds, (400, 3))
    probes = np.concatenate([points + step, points - step, scattered])
    exact = np.rint(_solid_angle_winding(mesh, probes)).astype(np.int64)
    assert set(exact.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(winding_numbers(mesh, probes), exact)
    held = exact[:800].reshape(2, -1) != 0
    on_union = held[0] != held[1]
    assert 100 < (~on_union).sum() < 180  # 139: a third of its area lies inside the other part
    kept = bounding_surface_samples(mesh, 400, seed=0)
    np.testing.assert_array_equal(kept[: on_union.sum()], points[on_union])  # the same draw, filtered
    assert len(kept) == 400


def test_a_folder_of_the_other_renderer_is_refused_not_resumed(tmp_path, capsys):
    from train.procedural.generate import main as generate_main

    args = ["--out", str(tmp_path), "--split", "heldout", "--count", "1", "--size", "16", "--no-mesh"]
    assert generate_main([*args, "--legacy-on-white"]) == 0
    with pytest.raises(SystemExit, match="rendered by 'mvdpp procedural \\(PyTorch rasteriser\\)'.*"
                                          "run with --legacy-on-white to read it"):
        generate_main(args)
    assert generate_main([*args, "--legacy-on-white"]) == 0  # the same renderer resumes
    assert "0 objects rendered" in capsys.readouterr().out


def test_upright_objects_turn_each_part_about_the_vertical_only_and_keep_every_other_draw():
    drawn = sample_parts(object_seed(Split.TRAIN, 5))
    turned = upright(drawn)
    for a, b in zip(drawn, turned, strict=True):
        assert dataclasses.replace(a, rotation=b.rotation) == b  # only the rotation changes
        up = Rotation.from_quat(b.rotation).as_matrix() @ np.array([0.0, 0.0, 1.0])
        assert up == pytest.approx([0.0, 0.0, 1.0], abs=1e-9)  # each part's own vertical stays vertical
        yaw = Rotation.from_quat(a.rotation).as_euler("zyx")[0]
        assert Rotation.from_quat(b.rotation).as_euler("zyx")[0] == pytest.approx(yaw, abs=1e-9)
    plain, standing = render_object(Split.TRAIN, 5, size=16), render_object(Split.TRAIN, 5, size=16, upright=True)
    assert standing.cameras["targets"] == plain.cameras["targets"]  # the same cameras, another object
    assert standing.cameras["conditions"] == plain.cameras["conditions"]
    assert np.abs(standing.targets.astype(int) - plain.targets.astype(int)).mean() > 1
    assert standing.cameras["source"] == "procedural train 5 upright"


def test_upright_keeps_each_parts_yaw_and_drops_its_tilt():
    part = sample_parts(object_seed(Split.HELDOUT, 0))[0]
    part = dataclasses.replace(part, rotation=tuple(Rotation.from_euler("zyx", [0.7, 0.4, -0.3]).as_quat()))
    turned = upright((part,))[0]
    assert Rotation.from_quat(turned.rotation).as_euler("zyx") == pytest.approx([0.7, 0.0, 0.0], abs=1e-9)


def test_a_folder_of_the_other_object_variant_is_refused_not_resumed(tmp_path, capsys):
    from train.procedural.generate import main as generate_main

    args = ["--out", str(tmp_path), "--split", "heldout", "--count", "1", "--size", "16", "--no-mesh"]
    assert generate_main([*args, "--upright"]) == 0
    with pytest.raises(SystemExit, match="holds an upright object .*run with --upright to read it"):
        generate_main(args)
    assert generate_main([*args, "--upright"]) == 0  # the same variant resumes
    assert "0 objects rendered" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert generate_main(["--out", str(plain), *args[2:]]) == 0
    with pytest.raises(SystemExit, match="holds an as-generated object .*run without --upright to read it"):
        generate_main(["--out", str(plain), *args[2:], "--upright"])
