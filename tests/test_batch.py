"""Batch generation (python -m mvdpp_core.batch): 2 processes under accelerate launch write the
same objects as 1 process, each object once; a run killed midway resumes to the same final
set without regenerating finished objects; a broken object is recorded and the rest go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_loop import script_env
from tiny_models import object_views

from mvdpp_core.batch import list_jobs, main

REPO = Path(__file__).resolve().parents[1]
GOOD = ["cup", "duck", "pear", "vase"]


def write_inputs(root: Path) -> Path:
    """4 good objects (1-3 RGBA views; folders and one loose image) and one unreadable image."""
    root.mkdir()
    for i, name in enumerate(GOOD):
        images, masks = object_views(n=1 + i % 3, size=64, seed=i)
        rgba = np.concatenate([images.permute(0, 2, 3, 1).numpy(), masks[..., None].numpy()], axis=-1)
        target = root if name == "pear" else root / name
        target.mkdir(exist_ok=True)
        for j, view in enumerate(rgba):
            path = root / "pear.png" if name == "pear" else target / f"{j:02d}.png"
            Image.fromarray((view * 255).round().astype(np.uint8)).save(path)
    (root / "broken").mkdir()
    (root / "broken" / "00.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def args(inputs: Path, out: Path, checkpoint: Path) -> list[str]:
    return ["--inputs", str(inputs), "--out", str(out), "--checkpoint", str(checkpoint), "--steps", "2",
            "--sampler", "ddim", "--guidance", "1.0", "--mesh-resolution", "32"]


def env(tmp: Path | None = None) -> dict[str, str]:
    """The scripts' environment (``tmp``: their TMPDIR) without a rank of the calling process."""
    return {k: v for k, v in script_env(tmp).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def finished(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Finished objects -> their files' contents (PNG pixels, GLB bytes)."""
    result = {}
    for folder in sorted(p for p in out.iterdir() if (p / "done.json").is_file()):
        files = {}
        for f in sorted(folder.iterdir()):
            if f.suffix == ".png":
                files[f.name] = np.asarray(Image.open(f), dtype=np.int16)
            elif f.suffix == ".glb":
                files[f.name] = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        result[folder.name] = files
    return result


def starts(out: Path) -> list[tuple[str, int]]:
    """(object, rank) of every generation started, over all ranks' logs."""
    events = []
    for log in sorted((out / "_logs").glob("rank*.jsonl")):
        rank = int(log.stem.removeprefix("rank"))
        events += [(json.loads(line)["object"], rank) for line in log.read_text().splitlines()]
    return events


def assert_same_objects(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) == GOOD
    for name, files in want.items():
        assert sorted(got[name]) == sorted(files), name
        assert len([f for f in files if f.startswith("view_")]) == 32 and "grid.png" in files and "mesh.glb" in files
        for f, content in files.items():
            if f.endswith(".png"):  # same seed per object whatever the rank: the same pixels
                assert np.abs(got[name][f] - content).max() <= 1, f"{name}/{f}"


@pytest.mark.slow
def test_two_processes_write_what_one_writes_and_a_killed_run_resumes(tiny_checkpoint, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert main(args(inputs, one, tiny_checkpoint)) == 0
    reference = finished(one)
    failure = json.loads((one / "_failed" / "broken.json").read_text())
    assert "broken" not in reference  # recorded, the rest went on; the reason names the file
    assert failure["reason"].startswith("ValueError: ") and "broken/00.png: not a readable image" in failure["reason"]

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           "-m", "mvdpp_core.batch", *args(inputs, two, tiny_checkpoint)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(tmp_path / "tmp"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_objects(finished(two), reference)
    started = starts(two)
    assert sorted(name for name, _ in started) == sorted([*GOOD, "broken"])  # each object once, over both ranks
    assert {rank for _, rank in started} == {0, 1}

    # Kill a 1-process run after its second object, then run it again to the end.
    run = subprocess.Popen([sys.executable, "-m", "mvdpp_core.batch", *args(inputs, killed, tiny_checkpoint)],
                           cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed.glob("*/done.json"))) < 2 and run.poll() is None:
        time.sleep(0.1)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    before = {p.parent.name: p.stat().st_mtime_ns for p in killed.glob("*/done.json")}
    assert 2 <= len(before) < len(GOOD), "the kill should land midway"
    first_run = len(starts(killed))
    assert main(args(inputs, killed, tiny_checkpoint)) == 0
    assert_same_objects(finished(killed), reference)
    again = [name for name, _ in starts(killed)[first_run:]]
    assert not set(again) & set(before)  # finished objects were not generated again
    kept = {p.parent.name: p.stat().st_mtime_ns for p in killed.glob("*/done.json") if p.parent.name in before}
    assert kept == before
    assert not list(killed.glob(".*.partial"))  # the interrupted object's partial folder is gone


def test_inputs_from_csv_keep_their_order_and_bad_names_are_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "list.csv").write_text("object,image\nmug,b.png\nmug,a.png\nbowl,/abs/c.png\n")
    jobs = list_jobs(tmp_path / "list.csv")
    assert [j.name for j in jobs] == ["bowl", "mug"]
    assert jobs[1].images == (tmp_path / "b.png", tmp_path / "a.png")  # first row = azimuth 0
    (tmp_path / "bad.csv").write_text("object,image\n../escape,a.png\n")
    with pytest.raises(ValueError, match="cannot be an output folder name"):
        list_jobs(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("name,path\nx,a.png\n")
    with pytest.raises(ValueError, match="object,image"):
        list_jobs(tmp_path / "cols.csv")
