"""scripts/train_default.py, the one-command run for a lent GPU, on the CPU: rendering shares
cover every object once, a rung (--parts) renders only objects of its number of primitives, the
run trains on the shipped MVAE, reports, and a rerun resumes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mvdpp_core.checkpoint import load_checkpoint
from train.data import format as fmt
from train.procedural.objects import Split, first_objects, part_count
from train.procedural.render import folder_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from train_default import RESERVE_MINUTES, chunks, last_rate, render, train_minutes  # noqa: E402


@pytest.mark.parametrize("count,jobs", [(1, 1), (5, 2), (7, 16), (8000, 16), (17, 5)])
def test_render_shares_cover_every_object_once_in_near_equal_parts(count, jobs):
    parts = chunks(count, jobs)
    assert len(parts) == min(count, jobs) and all(n >= 1 for _, n in parts)
    assert [i for start, n in parts for i in range(start, start + n)] == list(range(count))
    assert max(n for _, n in parts) - min(n for _, n in parts) <= 1


def test_a_rung_renders_only_objects_of_its_number_of_primitives(tmp_path):
    assert first_objects(Split.TRAIN, 4) == [0, 1, 2, 3]
    singles = first_objects(Split.TRAIN, 3, 1)
    assert len(singles) == 3 and all(part_count(Split.TRAIN, i) == 1 for i in singles)
    assert [i for i in range(singles[-1] + 1) if part_count(Split.TRAIN, i) == 1] == singles  # the first three
    render(tmp_path, 3, 2, parts=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder_name(Split.TRAIN, i) for i in singles]
    assert all(fmt.is_complete(p) for p in tmp_path.iterdir())


def test_the_upright_variant_renders_upright_objects(tmp_path):
    render(tmp_path, 2, 2, upright=True)
    sources = [json.loads((tmp_path / folder_name(Split.TRAIN, i) / fmt.CAMERAS_FILE).read_text())["source"]
               for i in range(2)]
    assert sources == ["procedural train 0 upright", "procedural train 1 upright"]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_default.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_one_command_renders_trains_on_the_shipped_mvae_reports_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    common = ["--work", str(work), "--out", str(out), "--objects", "5", "--jobs", "2", "--device", "cpu",
              "--set", "stage.max_cond_views=1"]
    run(*common, "--max-steps", "2", "--eval-count", "2")
    folders = sorted(p.name for p in (work / "data" / "train").iterdir() if fmt.is_complete(p))
    assert folders == [folder_name(Split.TRAIN, i) for i in range(5)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["object_passes"] == 4 and summary["passes_per_object"] == 0.8
    assert summary["eval_sampling"] == ["ddim", 2, 2.0] and summary["eval_mirror"]  # the embedded default's
    sampling = json.loads((out / "eval.json").read_text())["sampling"]
    assert sampling["mirror"] is True and sampling["average_seeds"] == 2  # so the figures compare
    ev = summary["eval"]
    assert 0 <= ev["mask_iou"] <= 1 and ev["retrieval_training_objects"] == 5
    assert ev["retrieval_mask_iou"] <= ev["retrieval_oracle_mask_iou"]
    assert ev["retrieval_knn"] == 5 and 0 <= ev["retrieval_knn_mean_mask_iou"] <= 1  # all 5: fewer than 16
    assert json.loads((out / "eval.json").read_text())["trained"]["1"]["objects"] == 2
    model = load_checkpoint(out / "model.safetensors")
    shipped = load_checkpoint(REPO / "models" / "mvdpp_default.safetensors")
    assert model.config.vae == shipped.config.vae
    theirs = shipped.vae.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.vae.state_dict().items())  # the frozen shipped MVAE
    assert "step 2 loss" in (out / "train.log").read_text()

    again = run(*common, "--max-steps", "3", "--eval-count", "0")
    assert "resumed from" in again.stdout and "at step 2" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "eval" not in summary


def test_an_upright_run_also_reports_the_objects_as_generated(tmp_path):
    """--upright trains and scores on upright objects, and scores the held-out objects as generated
    too (the issue's set), each from its own folder, so a run at scale reports both."""
    work, out = tmp_path / "work", tmp_path / "out"
    run("--work", str(work), "--out", str(out), "--objects", "2", "--jobs", "2", "--device", "cpu", "--upright",
        "--set", "stage.max_cond_views=1", "--max-steps", "1", "--eval-count", "1", "--no-retrieval")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["upright"] and set(summary["eval"]) == set(summary["eval_as_generated"]) >= {"mask_iou", "psnr"}
    assert json.loads((out / "eval.json").read_text())["upright"] is True
    assert json.loads((out / "eval_as_generated.json").read_text())["upright"] is False

    def source(folder: str) -> str:
        return json.loads((work / "data" / folder / folder_name(Split.HELDOUT, 0) / fmt.CAMERAS_FILE).read_text())[
            "source"]

    assert source("heldout_upright") == "procedural heldout 0 upright" and source("heldout") == "procedural heldout 0"


def test_a_mixed_run_trains_on_both_renders_and_reports_both_sets(tmp_path):
    """--mixed renders the first half of --objects as generated and the rest upright, in folders of
    their own, trains on the two joined with '::', and scores the objects as generated (eval.json)
    and the upright ones (eval_upright.json)."""
    work, out = tmp_path / "work", tmp_path / "out"
    run("--work", str(work), "--out", str(out), "--objects", "3", "--jobs", "2", "--device", "cpu", "--mixed",
        "--set", "stage.max_cond_views=1", "--max-steps", "1", "--eval-count", "1")
    generated, upright = work / "data" / "train_mixed_generated", work / "data" / "train_mixed_upright"
    assert sorted(p.name for p in generated.iterdir()) == [folder_name(Split.TRAIN, i) for i in range(2)]
    assert sorted(p.name for p in upright.iterdir()) == [folder_name(Split.TRAIN, 0)]
    assert json.loads((upright / folder_name(Split.TRAIN, 0) / fmt.CAMERAS_FILE).read_text())["source"].endswith(
        "upright")
    config = yaml.safe_load((work / "run_mixed" / "config.yaml").read_text())
    assert config["data"]["folders"] == f"{generated}::{upright}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mixed"] and not summary["upright"] and "eval_upright" in summary
    assert summary["eval"]["retrieval_training_objects"] == 3  # the nearest of both renders
    assert json.loads((out / "eval.json").read_text())["upright"] is False
    assert json.loads((out / "eval_upright.json").read_text())["upright"] is True


def test_bad_arguments_are_refused_with_the_value(tmp_path):
    for args, message in ((["--objects", "0"], "--objects 0: give at least 1"),
                          (["--minutes", "-2"], "--minutes -2.0: give 0"),
                          (["--eval-sampling", "ddim", "two", "2"], "--eval-sampling ddim two 2: give SAMPLER"),
                          (["--eval-average-seeds", "0"], "--eval-average-seeds 0: give 1 to 16"),
                          (["--out", str(tmp_path)], "is --work"),
                          (["--probe-steps", "40"], "--probe-steps 40 sizes the run by its time limit"),
                          (["--probe-steps", "1", "--minutes", "3"], "--probe-steps 1: give 0"),
                          (["--finish-within", "-1"], "--finish-within -1.0: give 0"),
                          (["--config", "nope.yaml"], "--config nope.yaml: no such file"),
                          (["--mixed", "--upright"], "--mixed already trains on upright objects"),
                          (["--mixed", "--objects", "1"], "--objects 1 with --mixed: give at least 2"),
                          # the trainer's config and the files it names: refused before any object is rendered
                          (["--set", "optim.nope=1"], "config error: unknown key(s) ['nope'] in optim"),
                          (["--config", str(REPO / "train" / "configs" / "default_unet_3.yaml"), "--decay",
                            "--set", "init.path=nope.safetensors"],
                           "config error: init.path=nope.safetensors does not exist; set it to the previous stage's"),
                          (["--config", str(REPO / "train" / "configs" / "default_unet_3.yaml"), "--decay",
                            "--set", "init.path=README.md"], "config error: init.path=README.md: ")):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_default.py"), "--work", str(tmp_path),
                               "--out", str(tmp_path / "o"), *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "data").exists(), "nothing is rendered before the arguments and the config are checked"
    if not torch.cuda.is_available():
        cmd = [sys.executable, str(REPO / "scripts" / "train_default.py"), "--work", str(tmp_path),
               "--out", str(tmp_path / "o"), "--device", "cuda"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and "torch sees no CUDA device here; use --device cpu" in proc.stderr, proc.stderr


def test_the_probe_rate_and_the_time_left_size_the_run():
    log = ["$ python train_mvdiff.py", "step 30 loss 0.79 skipped 0 (1.24 steps/s)\n",
           "step 60 loss 0.76 skipped 0 (1.70 steps/s)\n", "exported model.safetensors\n"]
    assert last_rate(log) == 1.70  # the last line: the second half, past the start-up
    with pytest.raises(RuntimeError, match="no 'steps/s' progress line"):
        last_rate(["nothing here"])
    args = argparse.Namespace(minutes=0.0, finish_within=8.5)
    started = time.perf_counter() - 180.0  # 3 minutes spent rendering
    assert abs(train_minutes(args, started) - (8.5 - 3.0 - RESERVE_MINUTES)) < 0.01
    assert train_minutes(argparse.Namespace(minutes=2.0, finish_within=8.5), started) == 2.0  # --minutes caps it
    assert train_minutes(argparse.Namespace(minutes=2.0, finish_within=0.0), started) == 2.0
    with pytest.raises(RuntimeError, match="leaves no time to train"):
        train_minutes(argparse.Namespace(minutes=0.0, finish_within=3.5), started)


def test_a_probed_continuation_of_the_shipped_default_decays_to_its_time_limit(tmp_path):
    """--config default_unet_3.yaml continues the shipped default; --probe-steps measures steps/s,
    and --decay ends the cosine at the step the time limit is expected at."""
    work, out = tmp_path / "work", tmp_path / "out"
    run("--work", str(work), "--out", str(out), "--objects", "3", "--jobs", "2", "--device", "cpu",
        "--config", str(REPO / "train" / "configs" / "default_unet_3.yaml"),
        "--set", f"init.path={REPO / 'models' / 'mvdpp_default.safetensors'}", "--set", "stage.max_cond_views=1",
        "--probe-steps", "4", "--minutes", "0.6", "--decay", "--eval-count", "0")
    summary = json.loads((out / "summary.json").read_text())
    rate = summary["probe_steps_per_s"]
    expected = max(1, int(0.95 * rate * (0.6 * 60.0 - 30.0)))
    assert rate > 0 and summary["config"] == "default_unet_3.yaml" and summary["steps"] == expected
    config = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert config["optim"]["max_steps"] == config["optim"]["decay_steps"] == expected
    assert config["optim"]["max_minutes"] == 0.6 and config["init"]["source"] == "bundle"
    assert yaml.safe_load((work / "probe" / "config.yaml").read_text())["optim"]["max_steps"] == 4
    shipped = load_checkpoint(REPO / "models" / "mvdpp_default.safetensors").unet.state_dict()
    model = load_checkpoint(out / "model.safetensors").unet.state_dict()
    drift = max((model[k] - v).abs().max().item() for k, v in shipped.items())
    assert 0 < drift < 0.05  # trained on, from the shipped weights (a random start differs by ~1)
