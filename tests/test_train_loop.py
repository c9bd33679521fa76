"""train_mvdiff.py on the tiny preset, CPU: DDP equivalence, exact resume, SIGKILL safety,
export that loads and generates, a corrupt data set that trains on."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mvdpp_core.checkpoint import load_checkpoint
from mvdpp_core.condition import ConditionViews
from mvdpp_core.config import PRESETS, PredictionType
from mvdpp_core.pipeline import generate
from train.config import TrainConfig, load_config
from train.data.synthetic import write_synthetic_dataset
from train.models import build_mvdiff_model
from train.train_mvdiff import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train" / "configs" / "tiny_cpu_stage1.yaml"
PYTHON = sys.executable


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects")
    write_synthetic_dataset(root, num_objects=4, image_size=32, num_cond=3, seed=1)
    return root


def overrides(data: Path, out: Path, **extra: object) -> list[str]:
    base = {
        "data.folders": str(data),
        "runtime.output_dir": str(out),
        "logging.tensorboard": "false",
        "stage.single_view_prob": 0.5,
        "stage.max_cond_views": 3,
        "stage.cond_dropout": 0.5,
        "optim.lr": 1e-3,
        "optim.max_steps": 3,
        "checkpoint.every": 100,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_config(data: Path, out: Path, **extra: object) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, overrides(data, out, **extra))


def unet_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def script_env(tmp: Path | None = None) -> dict[str, str]:
    """The scripts' environment; ``tmp``: their temporary folder (TMPDIR), so that what a launcher
    leaves there (torchelastic's run folders) stays inside the test's own folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return env


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    """DDP over 2 gloo ranks x batch 2 == 1 process x batch 4 (per-sample seeds, same samples)."""
    one, two = tmp_path / "one", tmp_path / "two"
    # Adam's eps large enough that float noise on near-zero gradients is not blown up to lr-sized steps.
    state = train(run_config(data_dir, one, **{"optim.batch_size": 4, "optim.eps": 1e-3}))
    cmd = [
        PYTHON,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        str(REPO / "train" / "train_mvdiff.py"),
        "--config",
        str(CONFIG),
        *[a for o in overrides(data_dir, two, **{"optim.batch_size": 2, "optim.eps": 1e-3}) for a in ("--set", o)],
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(tmp_path / "tmp"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = train_init_weights(data_dir, tmp_path / "init")
    w1, w2 = unet_weights(one, 3), unet_weights(two, 3)
    moved = max_diff(w1, init)
    assert moved > 1e-3  # training did move the weights...
    assert max_diff(w1, w2) < 1e-3 * moved  # ...and both splits moved them the same way
    losses_two = json.loads((two / "checkpoints" / "step_00000003" / "train_state.json").read_text())["losses"]
    assert losses_two == pytest.approx(state.losses, abs=1e-5)  # same samples, noise and dropout per step


def train_init_weights(data: Path, out: Path) -> dict[str, torch.Tensor]:
    """The initial trained weights, keyed as the checkpoints key them (``unet.*``)."""
    cfg = run_config(data, out)
    model = build_mvdiff_model(cfg.init, cfg.stage.prediction_type)
    return {f"unet.{k}": v.detach().clone() for k, v in model.unet.state_dict().items()}


def test_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    small = {"stage.max_cond_views": 1, "optim.batch_size": 1}  # one shape throughout: fast on a small CPU
    ref = train(run_config(data_dir, full, **{"optim.max_steps": 3}, **small))
    first = train(run_config(data_dir, split, **{"optim.max_steps": 2}, **small))
    resumed = train(run_config(data_dir, split, **{"optim.max_steps": 3}, **small))
    assert len(first.losses) == 2 and resumed.losses[:2] == first.losses
    assert resumed.losses == pytest.approx(ref.losses, abs=1e-6)
    assert max_diff(unet_weights(full, 3), unet_weights(split, 3)) < 1e-6
    ema_full = load_file(str(full / "checkpoints" / "step_00000003" / "ema.safetensors"))
    ema_split = load_file(str(split / "checkpoints" / "step_00000003" / "ema.safetensors"))
    assert max_diff(ema_full, ema_split) < 1e-6


def test_time_limit_stops_with_a_checkpoint_and_export_and_the_same_command_resumes(data_dir, tmp_path, monkeypatch):
    """optim.max_minutes: a clock that advances a minute per reading passes a 1.5-minute limit
    at step 2 of 4; the run stops there with a verified checkpoint and the export, and the
    same command (the limit lifted) continues to exactly the uninterrupted run."""
    import train.loop as loop

    small = {"stage.max_cond_views": 1, "optim.batch_size": 1, "optim.max_steps": 4}
    ref = train(run_config(data_dir, tmp_path / "full", **small))
    minutes = iter(range(1000))
    monkeypatch.setattr(loop, "_clock", lambda: 60.0 * next(minutes))
    out = tmp_path / "limited"
    stopped = train(run_config(data_dir, out, **small, **{"optim.max_minutes": 1.5}))
    assert stopped.step == 2 and len(stopped.losses) == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert loop.verify_checkpoint(out / "checkpoints" / "step_00000002") is None
    exported = load_checkpoint(out / "export" / "model.safetensors")
    ema = load_file(str(out / "checkpoints" / "step_00000002" / "ema.safetensors"))
    name = next(k for k in ema if k.startswith("unet."))
    assert torch.equal(exported.unet.state_dict()[name.removeprefix("unet.")], ema[name])  # the export is step 2's EMA
    monkeypatch.setattr(loop, "_clock", time.monotonic)
    resumed = train(run_config(data_dir, out, **small))
    assert resumed.step == 4
    assert resumed.losses == pytest.approx(ref.losses, abs=1e-6)
    assert max_diff(unet_weights(tmp_path / "full", 4), unet_weights(out, 4)) < 1e-6


def test_a_negative_time_limit_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"optim.max_minutes=-1.0 is not allowed; allowed: >= 0 \(0 = no time limit"):
        run_config(tmp_path, tmp_path / "out", **{"optim.max_minutes": -1.0})


def test_resume_keeps_the_architecture_the_run_started_with(data_dir, tmp_path, monkeypatch):
    """A preset edited between start and resume is not applied to the run's weights: a new head
    split changes no tensor shape (it would silently change the model), a new shape is refused."""
    out = tmp_path / "arch"
    small = {"stage.max_cond_views": 1, "optim.batch_size": 1}
    train(run_config(data_dir, out, **{"optim.max_steps": 1}, **small))
    started = PRESETS["tiny"].unet
    new_heads = dataclasses.replace(started, attention_head_dim=(1, 1))
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], unet=new_heads))
    train(run_config(data_dir, out, **{"optim.max_steps": 2}, **small))
    model = load_checkpoint(out / "export" / "model.safetensors")
    assert model.config.unet.attention_head_dim == started.attention_head_dim != new_heads.attention_head_dim
    attn = model.unet.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == started.attention_head_dim[0]

    deeper = dataclasses.replace(started, layers_per_block=2)
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], unet=deeper))
    with pytest.raises(ValueError, match="started with another architecture.*checkpoint.resume=false"):
        train(run_config(data_dir, out, **{"optim.max_steps": 3}, **small))
    fresh = train(run_config(data_dir, out, **{"optim.max_steps": 1, "checkpoint.resume": "false"}, **small))
    assert len(fresh.losses) == 1  # a new run records the new architecture
    assert load_checkpoint(out / "export" / "model.safetensors").config.unet.layers_per_block == 2


def test_sigkill_leaves_a_checkpoint_that_resumes(data_dir, tmp_path):
    out = tmp_path / "killed"
    args = [
        a
        for o in overrides(
            data_dir, out, **{"optim.max_steps": 10_000, "checkpoint.every": 1, "stage.max_cond_views": 1}
        )
        for a in ("--set", o)
    ]
    proc = subprocess.Popen(
        [PYTHON, str(REPO / "train" / "train_mvdiff.py"), "--config", str(CONFIG), *args],
        cwd=REPO,
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and int(latest.read_text().strip().split("_")[1]) >= 2:
                break
            time.sleep(0.2)
        time.sleep(0.7)  # land the kill somewhere inside a later step or save
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    step = int(latest.read_text().strip().split("_")[1])
    assert step >= 2
    resumed = train(
        run_config(data_dir, out, **{"optim.max_steps": step + 1, "checkpoint.every": 1, "stage.max_cond_views": 1})
    )
    assert len(resumed.losses) == step + 1  # the killed run's history plus one resumed step
    assert (out / "checkpoints" / f"step_{step + 1:08d}" / "train_state.json").is_file()
    assert not list((out / "checkpoints").glob(".tmp_step_*"))  # stale partial saves were cleaned


def test_export_loads_and_generates_with_the_stage_prediction_type(data_dir, tmp_path):
    out = tmp_path / "v"
    train(run_config(data_dir, out, **{"stage.prediction_type": "v_prediction", "optim.max_steps": 1}))
    model = load_checkpoint(out / "export" / "model.safetensors")
    assert model.config.schedule.prediction_type is PredictionType.V_PREDICTION
    assert model.config.image_size == 32
    ema = load_file(str(out / "checkpoints" / "step_00000001" / "ema.safetensors"))
    for name, value in model.unet.named_parameters():
        torch.testing.assert_close(value, ema[f"unet.{name}"])  # the bundle holds the EMA weights
    images, masks = torch.ones(1, 3, 32, 32) * 0.5, torch.zeros(1, 32, 32)
    masks[:, 8:24, 8:24] = 1
    result = generate(model, ConditionViews.framed(images, masks), steps=2, sampler="ddim")
    assert result.images.shape == (32, 3, 32, 32) and torch.isfinite(result.images).all()
    init = build_mvdiff_model(run_config(data_dir, out).init, PredictionType.V_PREDICTION)
    assert max_diff(model.image_encoder.state_dict(), init.image_encoder.state_dict()) == 0  # frozen


def test_a_trained_image_encoder_learns_and_is_exported(data_dir, tmp_path):
    """stage.train_image_encoder: gradients reach the encoder, its EMA is exported in the bundle."""
    out = tmp_path / "encoder"
    extra = {"stage.train_image_encoder": "true", "stage.cond_dropout": 0.0, "optim.max_steps": 2}
    train(run_config(data_dir, out, **extra))
    model = load_checkpoint(out / "export" / "model.safetensors")
    ema = load_file(str(out / "checkpoints" / "step_00000002" / "ema.safetensors"))
    assert {k.split(".")[0] for k in ema} == {"unet", "image_encoder"}
    for name, value in model.image_encoder.named_parameters():
        torch.testing.assert_close(value, ema[f"image_encoder.{name}"])
    init = build_mvdiff_model(run_config(data_dir, out).init, PredictionType.EPSILON)
    assert max_diff(model.image_encoder.state_dict(), init.image_encoder.state_dict()) > 1e-4


def test_embedding_dropout_closes_the_image_token_path(data_dir, tmp_path):
    """stage.embedding_dropout=1: the image tokens are always dropped, so no gradient reaches a
    trained image encoder (it moves only by weight decay), while the UNet still learns."""
    out = tmp_path / "embdrop"
    extra = {"stage.train_image_encoder": "true", "stage.cond_dropout": 0.0, "stage.embedding_dropout": 1.0,
             "optim.max_steps": 2}
    train(run_config(data_dir, out, **extra))
    model = load_checkpoint(out / "export" / "model.safetensors")
    init = build_mvdiff_model(run_config(data_dir, out).init, PredictionType.EPSILON)
    assert max_diff(model.image_encoder.state_dict(), init.image_encoder.state_dict()) < 1e-5
    assert max_diff(model.unet.state_dict(), init.unet.state_dict()) > 1e-4


def test_object_flags_are_per_seed_and_independent_streams():
    """The per-object dropouts (embedding: stream 9, first view: stream 10) depend only on each
    object's sample seed, so a batch split over ranks draws the same flags; they hit about p of
    the objects, and the two streams are not the same draw."""
    from train.train_mvdiff import object_flags

    seeds = list(range(1000, 3000))
    tokens, first = object_flags(seeds, 0.5, 9), object_flags(seeds, 0.5, 10)
    assert 0.45 < tokens.float().mean() < 0.55 and 0.45 < first.float().mean() < 0.55
    assert 0.4 < (tokens == first).float().mean() < 0.6  # independent: agree about half the time
    torch.testing.assert_close(object_flags(seeds[700:900], 0.5, 10), first[700:900])
    assert not object_flags(seeds, 0.0, 10).any() and object_flags(seeds, 1.0, 10).all()


def test_first_view_dropout_one_trains_on_the_papers_input(data_dir, tmp_path, monkeypatch):
    """stage.first_view_dropout=1 with target_condition: first_view: every target the UNet sees in
    training holds the empty latent (the paper's input), and the loss logs the dropped share."""
    from mvdpp_core.model import MVDPPModel

    seen = []
    original = MVDPPModel.unet_input

    def spy(self, noisy, cond, empty, target_ids=None, first_view=None):
        sample, ids = original(self, noisy, cond, empty, target_ids, first_view)
        if target_ids is not None:  # a training step (sampling passes none)
            seen.append((sample[:, : target_ids.shape[1], 5:].clone(), empty.clone()))
        return sample, ids

    monkeypatch.setattr(MVDPPModel, "unet_input", spy)
    out = tmp_path / "fvdrop"
    extra = {"init.architecture": "{target_condition: first_view}", "stage.cond_dropout": 0.0,
             "stage.first_view_dropout": 1.0, "optim.max_steps": 2}
    train(run_config(data_dir, out, **extra))
    assert len(seen) == 2
    for targets, empty in seen:
        torch.testing.assert_close(targets, empty[:, None].expand_as(targets))


def test_first_view_dropout_without_first_view_input_is_refused(data_dir, tmp_path):
    """stage.first_view_dropout has nothing to drop when the targets already hold the empty latent:
    a clear error, not a silently ignored switch."""
    with pytest.raises(ValueError, match=r"stage.first_view_dropout=0.5 needs target_condition: first_view.*empty"):
        train(run_config(data_dir, tmp_path / "refused", **{"stage.first_view_dropout": 0.5}))


def test_geometry_architecture_trains_and_exports(data_dir, tmp_path):
    """init.architecture switches the geometry encoding, epipolar and cosine attention, the
    condition-key bias and log-length scaling on; the encoding's and the temperatures' trained
    (EMA) weights, the two fixed gains and the scaling's reference reach the bundle."""
    out = tmp_path / "geometry"
    switches = ("geometry_encoding: true, epipolar_attention: true, cosine_attention: true, "
                "condition_attention_bias: true, length_scaled_attention: 8")
    extra = {"init.architecture": f"{{unet: {{{switches}}}}}", "init.geometry_init_std": 0.05,
             "init.epipolar_gain": 0.7, "init.condition_bias_gain": 0.5, "optim.max_steps": 1}
    train(run_config(data_dir, out, **extra))
    model = load_checkpoint(out / "export" / "model.safetensors")
    assert model.config.unet.geometry_encoding and model.unet.geometry is not None
    assert model.config.unet.epipolar_attention and model.config.unet.length_scaled_attention == 8
    assert all(torch.allclose(layer.gain, torch.tensor(0.7)) for layer in model.unet.epipolar.layers)
    assert all(torch.allclose(layer.gain, torch.tensor(0.5)) for layer in model.unet.condition_bias.layers)
    ema = load_file(str(out / "checkpoints" / "step_00000001" / "ema.safetensors"))
    for name, value in model.unet.geometry.named_parameters():
        torch.testing.assert_close(value, ema[f"unet.unet.geometry_encoding.{name}"])
    assert 0.03 < torch.cat([p.flatten() for p in model.unet.geometry.parameters()]).std() < 0.07
    assert model.config.unet.cosine_attention
    for name, value in model.unet.cosine.named_parameters():
        torch.testing.assert_close(value, ema[f"unet.unet.cosine_attention.{name}"])


def test_corrupt_png_and_missing_view_are_skipped_and_counted(tmp_path, caplog):
    data = tmp_path / "objects"
    folders = write_synthetic_dataset(data, num_objects=3, image_size=32, num_cond=2, seed=2)
    (folders[0] / "target_05.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    for name in [f"target_{i:02d}.png" for i in range(32)]:  # every target gone: any draw hits it
        (folders[1] / name).unlink()
    caplog.set_level("WARNING")
    state = train(
        run_config(
            data, tmp_path / "out", **{"optim.max_steps": 2, "stage.max_cond_views": 1, "data.num_target_views": 32}
        )
    )
    assert len(state.losses) == 2 and all(torch.isfinite(torch.tensor(state.losses)))
    assert state.skipped >= 2  # both broken objects were met (4 samples drawn from 3 objects)
    assert "obj_000000" in caplog.text and "obj_000001" in caplog.text and "missing" in caplog.text


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, tmp_path_factory) -> tuple[Path, list[float]]:
    """A run of 2 steps with a checkpoint after each."""
    out = tmp_path_factory.mktemp("two_checkpoints")
    state = train(run_config(data_dir, out, **{"optim.max_steps": 2, "checkpoint.every": 1, **SMALL}))
    return out, state.losses


SMALL = {"stage.max_cond_views": 1, "optim.batch_size": 1}


@pytest.mark.parametrize("damaged", ["model.safetensors", "ema.safetensors", "optimizer.bin", "train_state.json"])
def test_each_truncated_checkpoint_file_fails_verification_with_its_name(two_checkpoints, tmp_path, damaged):
    import shutil

    from train.config import CheckpointConfig
    from train.loop import Checkpointer, verify_checkpoint

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], out)
    folder = out / "checkpoints" / "step_00000002"
    assert verify_checkpoint(folder) is None
    victim = folder / damaged
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert damaged in verify_checkpoint(folder)
    ckpt = Checkpointer(out / "checkpoints", CheckpointConfig())
    assert ckpt.latest() == out / "checkpoints" / "step_00000001"
    assert [(p.name, damaged in why) for p, why in ckpt.skipped] == [("step_00000002", True)]
    for step in (1, 2):  # none left: a clear error naming each, never a silent fresh start
        (out / "checkpoints" / f"step_{step:08d}" / "train_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"no checkpoint .* can be resumed .*step_00000002: train_state.json is "
                                         r"unreadable.*checkpoint.resume=false"):
        ckpt.latest()


def test_a_run_resumes_past_a_truncated_latest_checkpoint(data_dir, two_checkpoints, tmp_path, caplog):
    """The run resumes from step 1 (the newest checkpoint that verifies), saying which one it skipped and why."""
    import shutil

    base, losses = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(base, out)
    victim = out / "checkpoints" / "step_00000002" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    caplog.set_level("WARNING")
    resumed = train(run_config(data_dir, out, **{"optim.max_steps": 3, "checkpoint.every": 1, **SMALL}))
    assert len(resumed.losses) == 3 and resumed.losses[:1] == losses[:1]  # step 1's history, then 2 new steps
    assert resumed.losses[1] == pytest.approx(losses[1], abs=1e-6)  # step 2 redone exactly
    assert "skipped checkpoint step_00000002: model.safetensors has" in caplog.text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_a_checkpoint_that_fails_verification_never_becomes_latest(data_dir, tmp_path, monkeypatch, caplog):
    """A short write (simulated: the EMA file of step 2 loses its tail) is caught before `latest` moves."""
    import train.loop as loop

    real_save = loop.save_file

    def short_write(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        if "00000002" in str(path):
            with open(path, "r+b") as f:
                f.truncate(Path(path).stat().st_size - 100)

    monkeypatch.setattr(loop, "save_file", short_write)
    caplog.set_level("ERROR")
    out = tmp_path / "short"
    train(run_config(data_dir, out, **{"optim.max_steps": 2, "checkpoint.every": 1, **SMALL}))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (out / "checkpoints" / "step_00000002").exists()
    assert "step_00000002 failed verification (ema.safetensors" in caplog.text


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    """optim.decay_steps: linear warmup, constant, then a cosine to 0 over the last decay_steps
    optimizer steps (half-way down at their middle); 0 keeps the LR constant after warmup."""
    from train.config import OptimConfig
    from train.loop import make_optimizer

    p = torch.nn.Parameter(torch.zeros(1))
    optim = OptimConfig(lr=1e-3, warmup_steps=10, max_steps=100, decay_steps=40)
    optimizer, scheduler = make_optimizer([p], optim)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[30] == lrs[59] == pytest.approx(1e-3)  # constant until step 60
    assert lrs[80] == pytest.approx(0.5e-3) and lrs[99] < 1e-5  # cosine to 0 by max_steps
    assert all(a >= b for a, b in zip(lrs[60:], lrs[61:], strict=False))
    optimizer, scheduler = make_optimizer([p], dataclasses.replace(optim, decay_steps=0))
    for _ in range(99):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_timestep_shift_moves_draws_toward_high_noise():
    """stage.timestep_shift: 1 keeps the uniform draws exactly as before (same numbers per
    seed); 3 maps u -> 3u / (1 + 2u), so P(t >= T/2) = P(u >= 1/4) = 0.75 and
    P(t >= 3T/4) = P(u >= 1/2) = 0.5, still drawn from each object's seed alone."""
    from train.data.dataset import mix_seed
    from train.train_mvdiff import training_noise

    seeds = list(range(5000, 9000))
    shape = torch.Size((len(seeds), 1, 1, 1, 1))
    uniform, _, _ = training_noise(seeds, shape, 1000, 0.1)
    first = torch.randint(0, 1000, (), generator=torch.Generator().manual_seed(mix_seed(seeds[0], 8)))
    assert uniform[0] == first
    shifted, noise, drop = training_noise(seeds, shape, 1000, 0.1, shift=3.0)
    assert 0.72 < (shifted >= 500).float().mean() < 0.78 and 0.47 < (shifted >= 750).float().mean() < 0.53
    assert 0.47 < (uniform >= 500).float().mean() < 0.53 and 0 <= int(shifted.min()) and int(shifted.max()) <= 999
    part, _, _ = training_noise(seeds[100:200], torch.Size((100, 1, 1, 1, 1)), 1000, 0.1, shift=3.0)
    torch.testing.assert_close(part, shifted[100:200])


def test_view_timesteps_are_shared_or_per_view_by_object():
    """stage.view_timestep_prob: an unflagged object keeps one timestep for all its views (the
    paper's, bit for bit); a flagged one draws one per view from the same (shifted) distribution;
    both from the sample seed only, so a split batch draws the same."""
    from train.train_mvdiff import object_flags, training_noise, view_timesteps

    seeds = list(range(5000, 5400))
    t, _, _ = training_noise(seeds, torch.Size((len(seeds), 1, 1, 1, 1)), 1000, 0.1, shift=3.0)
    torch.testing.assert_close(view_timesteps(seeds, t, 9, 0.0, 1000, 3.0), t[:, None].expand(-1, 9))
    views = view_timesteps(seeds, t, 9, 0.5, 1000, 3.0)
    independent = object_flags(seeds, 0.5, 11)
    assert 0.4 < independent.float().mean() < 0.6
    torch.testing.assert_close(views[~independent], t[~independent, None].expand(-1, 9))
    per_view = views[independent]
    assert (per_view != per_view[:, :1]).any(dim=1).all()  # each flagged object's views differ
    assert per_view.min() >= 0 and per_view.max() <= 999
    assert 0.70 < (per_view >= 500).float().mean() < 0.80  # shift 3 puts 75 % in the noisier half
    assert (views[independent, 0] != t[independent]).float().mean() > 0.9  # its own draw, not t's
    torch.testing.assert_close(view_timesteps(seeds[100:150], t[100:150], 9, 0.5, 1000, 3.0), views[100:150])


def test_view_timestep_prob_one_gives_each_view_its_own_noise_level(data_dir, tmp_path, monkeypatch):
    """stage.view_timestep_prob=1: the UNet sees a (b, v) timestep per view in training, each view
    noised to its own level, and the loss stays finite."""
    from mvdpp_core.schedule import NoiseSchedule

    seen = []
    original = NoiseSchedule.q_sample

    def spy(self, x0, t, noise):
        seen.append(t.clone())
        return original(self, x0, t, noise)

    monkeypatch.setattr(NoiseSchedule, "q_sample", spy)
    out = tmp_path / "viewt"
    state = train(run_config(data_dir, out, **{"stage.view_timestep_prob": 1.0, "optim.max_steps": 2}))
    assert len(seen) == 2 and state.step == 2 and torch.isfinite(torch.tensor(state.losses)).all()
    for t in seen:
        assert t.ndim == 2 and t.shape[1] > 1 and (t != t[:, :1]).any()


@pytest.mark.parametrize("embed", [False, True])
def test_encode_views_in_one_pass_equals_each_object_alone(embed):
    """The batch's one MVAE pass gives each object the latents, posterior noise and condition it
    gets when encoded alone (noise from its own seed), and a view slice (a view-parallel rank's
    share) the same rows as the whole: batching changes only how many kernels run."""
    from mvdpp_core import MVDPPModel, preset
    from train.train_mvdiff import encode_views

    torch.manual_seed(0)
    model = MVDPPModel(preset("tiny")).eval()
    size, b, t, k = model.config.image_size, 3, 4, 2
    batch = {
        "target_rgb": torch.rand(b, t, 3, size, size), "target_mask": (torch.rand(b, t, 1, size, size) > 0.5).float(),
        "cond_rgb": torch.rand(b, k, 3, size, size), "cond_mask": (torch.rand(b, k, 1, size, size) > 0.5).float(),
        "sample_seed": torch.tensor([11, 12, 13]),
    }
    x0, cond = encode_views(model, batch, slice(0, t + k), embed=embed)
    h = size // model.config.vae.downsample
    assert x0.shape == (b, t + k, 4, h, h) and cond.latents.shape == (b, k, 4, h, h)
    assert cond.embeddings.shape == (b, k, model.config.unet.cross_attention_dim)
    assert bool(cond.embeddings.abs().sum() > 0) == embed
    for i in range(b):
        alone = {key: value[i : i + 1] for key, value in batch.items()}
        x0_i, cond_i = encode_views(model, alone, slice(0, t + k), embed=embed)
        torch.testing.assert_close(x0[i : i + 1], x0_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond.latents[i : i + 1], cond_i.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cond.embeddings[i : i + 1], cond_i.embeddings, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x0[0], x0[1])  # objects draw their own noise
    part, part_cond = encode_views(model, batch, slice(2, 5), embed=embed)
    torch.testing.assert_close(part, x0[:, 2:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part_cond.latents, cond.latents, atol=1e-5, rtol=1e-5)


def test_cond_dropout_max_views_drops_only_objects_with_few_condition_views():
    """stage.cond_dropout_max_views=1: with cond_dropout 1 every one-view object trains without its
    condition and no two-view object does; 0 (the paper's) drops both."""
    from mvdpp_core import MVDPPModel, preset
    from train.config import StageConfig
    from train.train_mvdiff import TrainedModules, diffusion_loss

    torch.manual_seed(0)
    model = MVDPPModel(preset("tiny"))
    size, b = model.config.image_size, 2

    def batch(k: int) -> dict:
        return {"target_rgb": torch.rand(b, 2, 3, size, size), "target_mask": torch.ones(b, 2, 1, size, size),
                "target_ids": torch.tensor([[0, 8], [3, 20]]), "cond_rgb": torch.rand(b, k, 3, size, size),
                "cond_mask": torch.ones(b, k, 1, size, size), "sample_seed": torch.tensor([5, 6])}

    trained, empty = TrainedModules(model.unet), model.empty_latent(1).detach()
    for max_views, k, dropped in ((1, 1, 1.0), (1, 2, 0.0), (0, 2, 1.0), (2, 2, 1.0)):
        stage = StageConfig(cond_dropout=1.0, cond_dropout_max_views=max_views, max_cond_views=2)
        with torch.no_grad():
            _, stats = diffusion_loss(model, trained, batch(k), empty, stage)
        assert stats["dropped"] == dropped, (max_views, k)


def test_mask_loss_adds_its_term_and_trains_the_unet_through_the_frozen_decoder():
    """stage.mask_loss_weight adds w x the decoded-mask term to the latent loss (0: the loss as
    before); its gradient reaches the UNet through the MVAE decoder, which stays frozen; and it
    counts a pixel only on the wrong side of its true value."""
    from dataclasses import replace

    from mvdpp_core import MVDPPModel, preset
    from train.config import StageConfig
    from train.train_mvdiff import TrainedModules, diffusion_loss, wrong_side_error

    torch.manual_seed(0)
    model = MVDPPModel(preset("tiny"))
    model.vae.requires_grad_(False)
    size, b = model.config.image_size, 2
    batch = {"target_rgb": torch.rand(b, 2, 3, size, size),
             "target_mask": (torch.rand(b, 2, 1, size, size) > 0.5).float(),
             "target_ids": torch.tensor([[0, 8], [3, 20]]), "cond_rgb": torch.rand(b, 1, 3, size, size),
             "cond_mask": torch.ones(b, 1, 1, size, size), "sample_seed": torch.tensor([5, 6])}
    trained, empty = TrainedModules(model.unet), model.empty_latent(1).detach()
    plain = StageConfig(max_cond_views=1)
    with torch.no_grad():
        before, stats = diffusion_loss(model, trained, batch, empty, plain)
    assert "mask_loss" not in stats
    loss, stats = diffusion_loss(model, trained, batch, empty, replace(plain, mask_loss_weight=2.0))
    assert stats["mask_loss"] > 0
    torch.testing.assert_close(loss.detach(), before + 2.0 * stats["mask_loss"], atol=1e-5, rtol=1e-5)
    (loss - before).backward()  # the mask term alone
    assert all(p.grad is None for p in model.vae.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.unet.parameters() if p.grad is not None) > 0

    mask = torch.tensor([1.3, 0.6, -0.2, 0.5])
    truth = torch.tensor([1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(wrong_side_error(mask, truth), torch.tensor([0.0, 0.16, 0.0, 0.25]))


def test_the_progress_line_reports_the_losss_own_figures_averaged_over_the_interval(data_dir, tmp_path, capsys):
    """Each progress line carries the mean, since the previous line, of every figure the loss
    reports (the decoded-mask term with stage.mask_loss_weight), between the loss and the rate
    that scripts/train_default.py reads."""
    extra = {"stage.mask_loss_weight": 1.0, "optim.max_steps": 4, "logging.log_every": 2}
    train(run_config(data_dir, tmp_path / "figures", **extra))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2", "4"]
    for line in lines:
        words = line.split()
        figures = dict(zip(words[4:-4:2], map(float, words[5:-4:2]), strict=True))
        assert set(figures) == {"dropped", "first_view_dropped", "mask_loss"} and figures["mask_loss"] > 0
        assert 0 <= figures["dropped"] <= 1
        assert line.endswith("steps/s)") and float(line.rsplit("(", 1)[1].split()[0]) > 0  # as last_rate reads it
