"""train_mvdiff with parallel.view_group_size = 2 on 2 gloo CPU processes: each object's views
split over the two ranks give the loss and every gradient of one process holding all views,
and a resumed split run continues exactly like an uninterrupted one-process run; with the plain
tiny model and with the embedded default's architecture (first view in the targets, geometry
encoding, epipolar and condition-key biases at gain 1)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import CONFIG, PYTHON, REPO, script_env

from train.config import ParallelConfig, TrainConfig, load_config
from train.data.synthetic import write_synthetic_dataset
from train.models import build_mvdiff_model
from train.train_mvdiff import train
from train.view_parallel import check_parallel, view_shares

LR, EPS = 0.1, 1.0
RECIPE = {
    "init.architecture": "{target_condition: first_view, unet: {geometry_encoding: true, epipolar_attention: true, "
    "condition_attention_bias: true}}",
    "init.geometry_init_std": 0.05,
    "init.epipolar_gain": 1.0,
    "init.condition_bias_gain": 1.0,
}


def settings(data: Path, out: Path, **extra: object) -> list[str]:
    base = {
        "data.folders": str(data),
        "data.num_target_views": 4,  # 4 targets + 1 condition view: unequal shares (2 + 3 views) on 2 ranks
        "runtime.output_dir": str(out),
        "logging.tensorboard": "false",
        "stage.single_view_prob": 1.0,
        "stage.max_cond_views": 1,
        "stage.cond_dropout": 0.5,
        "stage.cond_loss_weight": 0.5,
        # A first AdamW step moves each weight by lr * g / (|g| + eps): with weight decay and
        # clipping off, the gradient is read back exactly from the step (see grads_from_step).
        "optim.lr": LR,
        "optim.eps": EPS,
        "optim.weight_decay": 0.0,
        "optim.max_grad_norm": 0.0,
        "optim.batch_size": 2,
        "checkpoint.every": 1,
        "checkpoint.keep_last": 5,
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def launch_two(data: Path, out: Path, **extra: object) -> None:
    cmd = [
        PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
        str(REPO / "train" / "train_mvdiff.py"), "--config", str(CONFIG),
        *[a for o in settings(data, out, **{"parallel.view_group_size": 2, **extra}) for a in ("--set", o)],
    ]
    env = script_env(out.parent / "tmp")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def losses(out: Path, step: int) -> list[float]:
    return json.loads((out / "checkpoints" / f"step_{step:08d}" / "train_state.json").read_text())["losses"]


def grads_from_step(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert the first AdamW step u = lr * g / (|g| + eps) (bias-corrected moments g and g^2)."""
    grads = {}
    for k, w in before.items():
        u = (w - after[k]).double()
        grads[k] = torch.sign(u) * EPS * u.abs() / (LR - u.abs())
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("arch", [{}, RECIPE], ids=["plain", "default-architecture"])
def test_views_split_over_two_ranks_match_one_process_and_resume(tmp_path, arch):
    data = tmp_path / "objects"
    write_synthetic_dataset(data, num_objects=4, image_size=32, num_cond=3, seed=3)
    one, split = tmp_path / "one", tmp_path / "split"
    ref = train(load_config(TrainConfig, CONFIG, settings(data, one, **{"optim.max_steps": 2, **arch})))
    launch_two(data, split, **{"optim.max_steps": 1, **arch})
    launch_two(data, split, **{"optim.max_steps": 2, **arch})  # resumes from step 1

    cfg = load_config(TrainConfig, CONFIG, settings(data, one, **arch))
    unet = build_mvdiff_model(cfg.init, cfg.stage.prediction_type).unet
    init = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    g_one, g_split = grads_from_step(init, weights(one, 1)), grads_from_step(init, weights(split, 1))
    largest = max(g.abs().max().item() for g in g_one.values())
    assert largest > 1e-3  # real gradients, so equality below is not 0 == 0
    for name, g in g_one.items():
        # Read back from float32 weights, g is known to ~ulp(w) * (1 + |g|) / lr (w and g both ~0.1).
        resolution = 4 * init[name].abs().max().item() * 2**-23 * (1 + g.abs().max().item()) / LR
        torch.testing.assert_close(g_split[name], g, atol=resolution + 1e-5 * largest, rtol=1e-4, msg=name)
    assert losses(split, 1) == pytest.approx(ref.losses[:1], rel=1e-5)
    # The resumed split run: the same second step as the uninterrupted one-process run.
    assert losses(split, 2) == pytest.approx(ref.losses, rel=1e-5)
    w_one, w_split = weights(one, 2), weights(split, 2)
    moved = max((w_one[k] - weights(one, 1)[k]).abs().max().item() for k in w_one)
    assert moved > 1e-5
    assert max((w_one[k] - w_split[k]).abs().max().item() for k in w_one) < 1e-2 * moved


def test_view_shares_tile_the_views_and_bad_group_sizes_are_refused():
    shares = view_shares(42, 8)  # 32 targets + 10 condition views over 8 GPUs
    assert [s.stop - s.start for s in shares] == [5, 5, 5, 6, 5, 5, 5, 6]
    assert shares[0].start == 0 and shares[-1].stop == 42
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:], strict=False))
    with pytest.raises(ValueError, match="divide the number of processes"):
        check_parallel(ParallelConfig(view_group_size=3), 8, 32)
    with pytest.raises(ValueError, match="num_target_views"):
        check_parallel(ParallelConfig(view_group_size=8), 8, 4)
    with pytest.raises(ValueError, match="unknown key"):
        load_config(TrainConfig, CONFIG, ["parallel.view_groups=2"])
