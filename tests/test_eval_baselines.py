"""The baselines of scripts/eval_default.py measure what they claim: recalling the training
set finds an object that is in it (nearest neighbour by input mask and the oracle both score
mask IoU 1), and scores below 1 against another object's views; the mean of the nearest
training objects' masks is their majority vote, and with one neighbour the nearest object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import eval_default
from scripts.eval_default import first_masks, heldout_folders, main, mask_iou, retrieval_baseline
from train.data.synthetic import write_synthetic_dataset
from train.diagnostics import per_view_iou
from train.procedural.objects import Split, object_seed, part_count, sample_parts


def test_retrieval_recalls_an_object_of_its_training_set(tmp_path, monkeypatch):
    folders = write_synthetic_dataset(tmp_path / "train", num_objects=4, image_size=32, num_cond=1, seed=5)
    result = retrieval_baseline(folders, tmp_path / "train", 32)
    assert result["training_objects"] == 4
    assert result["mask_iou"] == 1.0 and result["oracle_mask_iou"] == 1.0
    assert result["mask_iou_other"] < 0.95
    held_out = write_synthetic_dataset(tmp_path / "heldout", num_objects=3, image_size=32, num_cond=1, seed=6)
    other = retrieval_baseline(held_out, tmp_path / "train", 32)
    assert other["mask_iou"] <= other["oracle_mask_iou"] < 1.0  # the oracle bounds the nearest neighbour
    assert other["knn"] == 4  # all 4 training objects: their per-pixel majority (ties go out)
    majority = torch.stack([first_masks(f, 32)[1] for f in folders]).float().mean(0)
    expected = [mask_iou(majority, first_masks(f, 32)[1].float()) for f in held_out]
    assert other["knn_mean_mask_iou"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    monkeypatch.setattr(eval_default, "KNN_MEAN", 1)  # the mean of one neighbour is the nearest neighbour
    one = retrieval_baseline(held_out, tmp_path / "train", 32)
    assert one["knn"] == 1 and one["knn_mean_mask_iou"] == pytest.approx(other["mask_iou"], abs=1e-12)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete object folder"):
        retrieval_baseline(folders, tmp_path / "empty", 32)
    # a training set of two '::'-joined folders (train_default.py --mixed) holds both: each held-out
    # object is now among the training objects, so the nearest one is itself
    joined = retrieval_baseline(held_out, Path(f"{tmp_path / 'train'}::{tmp_path / 'heldout'}"), 32)
    assert joined["training_objects"] == 7 and joined["mask_iou"] == 1.0
    # the command refuses a missing or empty training folder before it evaluates anything
    for train, message in ((tmp_path / "missing", "data folder .*missing does not exist"),
                           (tmp_path / "empty", "empty holds no complete object folder")):
        with pytest.raises(SystemExit, match=f"error: --retrieval-baseline.*{message}"):
            main(["--heldout", str(tmp_path / "never"), "--retrieval-baseline", str(train),
                  "--out", str(tmp_path / "r.json")])
        assert not (tmp_path / "never").exists()


def test_parts_selects_objects_by_their_number_of_primitives(tmp_path, capsys):
    # --parts K evaluates a difficulty rung: the first objects made of exactly K primitives, in
    # index order, rendered where missing; any other K is refused by name.
    singles = [i for i in range(40) if len(sample_parts(object_seed(Split.HELDOUT, i))) == 1][:2]
    assert singles == [0, 11]  # held-out objects are pure functions of their index
    folders = heldout_folders(tmp_path, 2, 64, Split.HELDOUT, parts=1)
    assert [f.name for f in folders] == ["heldout_0000000", "heldout_0000011"]
    assert all((f / "mesh.ply").is_file() and (f / "cameras.json").is_file() for f in folders)
    assert [part_count(Split.HELDOUT, i) for i in range(12)].count(1) == 2
    assert {part_count(Split.TRAIN, i) for i in range(30)} == {1, 2, 3}
    with pytest.raises(SystemExit) as refused:
        main(["--heldout", str(tmp_path), "--parts", "4", "--out", str(tmp_path / "r.json")])
    assert refused.value.code == 2
    assert "--parts: invalid choice: 4" in capsys.readouterr().err


def test_per_view_mask_iou_and_its_rig_grid():
    # Each view's IoU on its own (1 where both masks are empty), and the grid puts rig view
    # i = elevation * 8 + azimuth at [elevation][azimuth], averaged over the objects.
    truth = torch.zeros(3, 4, 4)
    truth[:, :2] = 1  # 8 of 16 pixels
    pred = truth.clone()
    pred[1] = 0
    pred[1, :, :2] = 1  # overlaps 4 of 12 in the union
    pred[2] = 0
    truth[2] = 0  # both empty
    assert per_view_iou(pred, truth).tolist() == pytest.approx([1.0, 1 / 3, 1.0])
    assert eval_default.mask_iou(pred, truth) == pytest.approx(12 / 20)  # pooled, unlike the per-view mean
    rows = [eval_default.ObjectMetrics(0, 0, 0, 0, 0, mask_iou_views=[(i + k) / 64 for i in range(32)]) for k in (0, 2)]
    by_view = eval_default.by_view_grid(rows)
    assert by_view["grid"][2][5] == pytest.approx((2 * 8 + 5 + 1) / 64, abs=1e-4)  # stored to 4 decimals
    assert by_view["by_azimuth"][3] == pytest.approx((np.mean([e * 8 + 3 for e in range(4)]) + 1) / 64, abs=1e-4)
    assert by_view["by_elevation"][1] == pytest.approx((8 + 3.5 + 1) / 64, abs=1e-4)
    assert eval_default.by_view_grid([eval_default.ObjectMetrics(0, 0, 0, 0, 0)]) == {}  # older reports


def test_evaluation_reports_each_object_as_it_finishes(tmp_path, monkeypatch, capsys):
    """A long evaluation prints one line per object (its place in the run and its mask IoU),
    and view counts above 1 run on the first ``multi_count`` objects only."""
    scores = iter([0.5, 0.25, 0.75, 0.125, 0.625])

    def scored(model, folder, n, cfg, with_mesh, other=None, grid=None):
        return eval_default.ObjectMetrics(0, 0, next(scores), 0, 0)

    monkeypatch.setattr(eval_default, "evaluate_object", scored)
    folders = [tmp_path / f"heldout_{i:07d}" for i in range(3)]
    results = eval_default.evaluate_model(None, folders, [1, 2], eval_default.SamplingConfig(), label="t",
                                          multi_count=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if " object " in line]
    assert [line.split(",")[0] for line in lines] == [
        "[t] 1 view(s): object 1/3 heldout_0000000", "[t] 1 view(s): object 2/3 heldout_0000001",
        "[t] 1 view(s): object 3/3 heldout_0000002", "[t] 2 view(s): object 1/2 heldout_0000000",
        "[t] 2 view(s): object 2/2 heldout_0000001"]
    assert [line.split(", ")[1] for line in lines] == ["mask IoU 0.500", "mask IoU 0.250", "mask IoU 0.750",
                                                       "mask IoU 0.125", "mask IoU 0.625"]
    assert results["2"]["summary"]["mask_iou"]["mean"] == pytest.approx(0.375)


def test_a_checkpoint_of_another_recipe_is_told_how_to_get_the_embedded_sampling(tiny_checkpoint, tmp_path):
    """A bundle that is not of the default recipe gets the general sampling (20 dpmpp_2m steps), which
    a model of that recipe samples badly: the run says so before it starts, and the flags it names give
    exactly the embedded default's sampling. A copy of the embedded default needs no flags."""
    import shutil

    from mvdpp_core.sampling_defaults import EMBEDDED_CHECKPOINT, EMBEDDED_SAMPLING, default_sampling

    copy = shutil.copy(EMBEDDED_CHECKPOINT, tmp_path / "copy_of_the_default.safetensors")
    assert default_sampling(copy) == EMBEDDED_SAMPLING
    general = default_sampling(tiny_checkpoint)
    assert general != EMBEDDED_SAMPLING
    assert "not the embedded default's" not in eval_default.sampling_line(EMBEDDED_SAMPLING)
    line = eval_default.sampling_line(general)
    assert line.startswith(f"[sampling] {general[0]}, {general[1]} steps") and eval_default.EMBEDDED_FLAGS in line
    args = eval_default.parse_args(["--checkpoint", str(tiny_checkpoint), "--heldout", str(tmp_path), "--out",
                                    "r.json", *eval_default.EMBEDDED_FLAGS.split()])
    given = default_sampling(args.checkpoint, sampler=args.sampler, steps=args.steps, cfg=args.guidance,
                             mirror_average=args.mirror, average_seeds=args.average_seeds,
                             input_average=args.input_average)
    assert given == EMBEDDED_SAMPLING


def test_per_view_attention_restricts_every_layer_of_the_evaluated_model(tmp_path, monkeypatch):
    """--per-view-attention evaluates the checkpoint with every attention layer kept to its own view
    (what the outputs owe to the cross-view path), and the report says so; without it the
    checkpoint's global self-attention stays. --flow-count measures the cross-view path directly:
    the other views' share of a probe view's x0 error is exactly 0 with --per-view-attention and
    not 0 without. The embedded default is evaluated with its partner, and the flag reaches both."""
    from mvdpp_core.pipeline import ensemble_members

    seen = {}

    def capture(model, folders, views, cfg, label, **kwargs):
        seen[label] = [{name: proc.global_views for name, proc in member.unet.unet.attn_processors.items()}
                       for member in ensemble_members(model)]
        kwargs["on_result"]({})
        return {}

    monkeypatch.setattr(eval_default, "evaluate_model", capture)
    for flag in ([], ["--per-view-attention"]):
        out = tmp_path / f"r{len(flag)}.json"
        main(["--heldout", str(tmp_path / "heldout"), "--count", "1", "--views", "1", "--copy-count", "0",
              "--no-baseline", "--flow-count", "1", "--out", str(out), *flag])
        report = json.loads(out.read_text())
        assert report["per_view_attention"] is bool(flag)
        shares = [r["share"] for r in report["flow"]["sibling_share"]]
        assert all(share == 0.0 for share in shares) if flag else all(abs(share) > 1e-4 for share in shares)
        assert len(report["flow"]["attention_t900"]) == (0 if flag else 4)  # the recorder sees global layers only
        members = seen.pop("trained")
        assert len(members) == 2  # the embedded default and its partner
        for globals_ in members:
            assert any(name.endswith("attn1.processor") for name in globals_)
            if flag:
                assert not any(globals_.values())
            else:  # self-attention (attn1) global, cross-attention (attn2) per view
                assert all(is_global == name.endswith("attn1.processor") for name, is_global in globals_.items())
