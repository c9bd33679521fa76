"""Strict YAML configs: unknown keys, arithmetic, wrong types and enums fail with a message
that names the key; dotted overrides; every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvdpp_core.config import PredictionType
from train.config import InitSource, MVAETrainConfig, Precision, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
SCALES = ("tiny_cpu_", "1gpu_", "8gpu_fsdp2_", "multinode_")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_the_allowed_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\] in optim; allowed: \[.*'lr'"):
        load_config(TrainConfig, write(tmp_path, "optim:\n  learning_rate: 1.0e-4\n"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['optimiser'\].*allowed: \[.*'optim'"):
        load_config(TrainConfig, write(tmp_path, "optimiser:\n  lr: 1.0e-4\n"))


def test_arithmetic_and_wrong_types_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"optim\.lr='2\*1e-4'.*no arithmetic"):
        load_config(TrainConfig, write(tmp_path, "optim:\n  lr: 2*1e-4\n"))
    with pytest.raises(ValueError, match=r"optim\.max_steps=1000\.5 must be an integer"):
        load_config(TrainConfig, write(tmp_path, "optim:\n  max_steps: 1000.5\n"))
    with pytest.raises(ValueError, match=r"ema\.enabled='yes please' must be true or false"):
        load_config(TrainConfig, write(tmp_path, "ema:\n  enabled: yes please\n"))
    with pytest.raises(ValueError, match=r"stage\.prediction_type='x0' is not one of \['epsilon', 'v_prediction'\]"):
        load_config(TrainConfig, write(tmp_path, "stage:\n  prediction_type: x0\n"))


def test_yaml_exponent_strings_are_numbers(tmp_path):
    cfg = load_config(TrainConfig, write(tmp_path, "optim:\n  lr: 1e-5\n"))  # YAML 1.1 reads 1e-5 as a string
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)


def test_dotted_overrides(tmp_path):
    cfg = load_config(
        TrainConfig,
        write(tmp_path, "optim:\n  lr: 1.0e-4\n"),
        ["optim.lr=3e-6", "stage.prediction_type=v_prediction", "optim.betas=[0.9, 0.99]", "init.source=bundle"],
    )
    assert cfg.optim.lr == 3e-6 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.stage.prediction_type is PredictionType.V_PREDICTION and cfg.init.source is InitSource.BUNDLE
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lrr'\] in optim"):
        load_config(TrainConfig, None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="is not 'section.key=value'"):
        load_config(TrainConfig, None, ["optim.lr"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cls = MVAETrainConfig if "mvae" in path.name else TrainConfig
    cfg = load_config(cls, path)
    assert cfg.runtime.output_dir
    if "cpu" in path.name:
        assert cfg.runtime.precision is Precision.FP32
    if cls is TrainConfig and path.name.startswith(SCALES) and "stage" in path.name:  # the paper's stages
        stage = int(path.stem.rsplit("stage", 1)[1])
        assert cfg.stage.prediction_type is (PredictionType.EPSILON if stage == 1 else PredictionType.V_PREDICTION)
        assert cfg.stage.max_cond_views == (10 if stage == 3 else 1)


def test_default_continuation_trains_the_same_model_with_the_same_loss():
    """default_unet_3.yaml continues default_unet.yaml's export on more objects: only the data,
    the schedule and the starting point may differ, so the shipped default is one recipe."""
    first = load_config(TrainConfig, CONFIGS / "default_unet.yaml")
    cont = load_config(TrainConfig, CONFIGS / "default_unet_3.yaml")
    assert cont.stage == first.stage and cont.ema == first.ema and cont.runtime.precision is first.runtime.precision
    same = ("lr", "betas", "weight_decay", "max_grad_norm", "batch_size", "grad_accum_steps")
    assert [getattr(cont.optim, k) for k in same] == [getattr(first.optim, k) for k in same]
    assert cont.data.num_target_views == first.data.num_target_views and cont.data.seed != first.data.seed
    assert cont.optim.decay_steps == cont.optim.max_steps  # the learning rate ends at 0
    assert cont.init.source is InitSource.BUNDLE and cont.init.path.startswith(first.runtime.output_dir)
    assert cont.runtime.output_dir != first.runtime.output_dir and cont.data.folders != first.data.folders


def test_default_step_5_changes_only_the_two_levers_it_names():
    """default_unet_4.yaml (the first candidate step 5, not shipped) continues step 4's export on the same
    objects with the epipolar bias switched on and half the objects unconditioned, each target
    view at its own timestep; the model's weights, the loss and everything else stay step 4's."""
    from dataclasses import replace

    prev = load_config(TrainConfig, CONFIGS / "default_unet_3.yaml")
    cont = load_config(TrainConfig, CONFIGS / "default_unet_4.yaml")
    assert cont.stage == replace(prev.stage, cond_dropout=0.5, view_timestep_prob=1.0)
    assert cont.init == replace(prev.init, path=cont.init.path, epipolar_gain=1.0)
    assert cont.init.path.startswith(prev.runtime.output_dir) and cont.data.folders == prev.data.folders
    assert cont.ema == prev.ema and cont.runtime.precision is prev.runtime.precision
    assert replace(cont.optim, lr=prev.optim.lr, max_steps=prev.optim.max_steps,
                   decay_steps=prev.optim.decay_steps) == prev.optim
    assert cont.optim.decay_steps == cont.optim.max_steps and cont.data.seed != prev.data.seed


def test_shipped_step_5_differs_from_the_first_candidate_only_in_whom_it_drops():
    """default_unet_5.yaml (the shipped default's step 5) is default_unet_4.yaml (the first
    candidate) with the condition dropped only from one-view objects: same start, data,
    schedule and levers otherwise."""
    from dataclasses import replace

    first = load_config(TrainConfig, CONFIGS / "default_unet_4.yaml")
    second = load_config(TrainConfig, CONFIGS / "default_unet_5.yaml")
    assert first.stage.cond_dropout_max_views == 0 and second.stage.cond_dropout_max_views == 1
    assert replace(second, stage=first.stage, runtime=first.runtime) == first
    assert replace(second.runtime, output_dir=first.runtime.output_dir) == first.runtime


def test_step_6_continues_step_5_on_new_objects_rendered_with_straight_alpha():
    """default_unet_6.yaml continues step 5's export with step 5's recipe unchanged: only the
    data (new objects, the straight-alpha renderer), its order, the length and the start differ
    (the bundle carries step 5's epipolar gain, so none is set)."""
    from dataclasses import replace

    five = load_config(TrainConfig, CONFIGS / "default_unet_5.yaml")
    six = load_config(TrainConfig, CONFIGS / "default_unet_6.yaml")
    assert six.stage == five.stage and six.ema == five.ema
    assert six.init == replace(five.init, path=six.init.path, epipolar_gain=0.0)
    assert six.init.path.startswith(five.runtime.output_dir)
    assert replace(six.optim, max_steps=five.optim.max_steps, decay_steps=five.optim.decay_steps) == five.optim
    assert six.optim.decay_steps == six.optim.max_steps
    assert replace(six.data, folders=five.data.folders, seed=five.data.seed) == five.data
    assert six.data.folders != five.data.folders and six.data.seed != five.data.seed
    assert replace(six.runtime, output_dir=five.runtime.output_dir, seed=five.runtime.seed) == five.runtime


def test_step_7_is_step_6_on_the_latents_of_the_mvae_trained_with_the_foreground_term():
    """default_unet_7.yaml differs from step 6 only in the MVAE it encodes with (default_mvae_4.yaml's,
    calibrated), its data order, length and output; default_mvae_4.yaml continues step 5's
    bundle's MVAE with step 2's MVAE recipe plus the foreground term, encoder included, on step 6's data."""
    from dataclasses import replace

    six = load_config(TrainConfig, CONFIGS / "default_unet_6.yaml")
    seven = load_config(TrainConfig, CONFIGS / "default_unet_7.yaml")
    assert seven.stage == six.stage and seven.ema == six.ema and seven.data.folders == six.data.folders
    assert seven.init == replace(six.init, mvae_path=seven.init.mvae_path) and seven.init.mvae_path
    assert replace(seven.optim, max_steps=six.optim.max_steps, decay_steps=six.optim.decay_steps) == six.optim
    assert seven.optim.decay_steps == seven.optim.max_steps
    assert replace(seven.runtime, output_dir=six.runtime.output_dir, seed=six.runtime.seed) == six.runtime
    two = load_config(MVAETrainConfig, CONFIGS / "default_mvae_2.yaml")
    four = load_config(MVAETrainConfig, CONFIGS / "default_mvae_4.yaml")
    assert two.loss.foreground_weight == 0 and four.loss.foreground_weight > 0 and four.init.train_encoder
    assert replace(four.loss, foreground_weight=0.0) == two.loss
    assert replace(four.optim, max_steps=two.optim.max_steps) == two.optim
    assert four.data.folders == six.data.folders and four.init.path == seven.init.path  # both start from step 5


def test_step_8_continues_step_7_with_its_recipe():
    """default_unet_8.yaml is step 7 again from step 7's export: the same model, MVAE, loss, batch,
    schedule and length; only its starting point, data order and output differ."""
    from dataclasses import replace

    seven = load_config(TrainConfig, CONFIGS / "default_unet_7.yaml")
    eight = load_config(TrainConfig, CONFIGS / "default_unet_8.yaml")
    assert eight.stage == seven.stage and eight.ema == seven.ema and eight.optim == seven.optim
    assert eight.init == replace(seven.init, path=eight.init.path) and "unet7" in eight.init.path
    assert eight.data == replace(seven.data, seed=eight.data.seed) and eight.data.seed != seven.data.seed
    assert replace(eight.runtime, output_dir=seven.runtime.output_dir, seed=seven.runtime.seed) == seven.runtime
    assert eight.checkpoint == seven.checkpoint and eight.logging == seven.logging


def test_the_upright_continuations_keep_step_8s_recipe():
    """default_unet_upright.yaml continues step 8 on upright objects and default_unet_upright_2.yaml
    continues its export on more of them: the same model, MVAE, loss and batch as step 8; each
    a cosine to 0 over its own length, a new data order and its own output."""
    from dataclasses import replace

    eight = load_config(TrainConfig, CONFIGS / "default_unet_8.yaml")
    first = load_config(TrainConfig, CONFIGS / "default_unet_upright.yaml")
    second = load_config(TrainConfig, CONFIGS / "default_unet_upright_2.yaml")
    for prev, cont in ((eight, first), (first, second)):
        assert cont.stage == prev.stage and cont.ema == prev.ema
        assert cont.optim.decay_steps == cont.optim.max_steps  # the learning rate ends at 0
        assert replace(cont.optim, max_steps=0, decay_steps=0, warmup_steps=0) == replace(
            eight.optim, max_steps=0, decay_steps=0, warmup_steps=0)
        assert cont.init.mvae_path == "models/mvdpp_default.safetensors" and cont.data.seed != prev.data.seed
        assert cont.runtime.output_dir not in (prev.runtime.output_dir, eight.runtime.output_dir)
    assert first.init.path == "models/mvdpp_default.safetensors"  # step 8, shipped
    assert second.init.path == first.runtime.output_dir + "/export/model.safetensors"
    assert second.data.folders == first.data.folders and second.optim.max_steps > first.optim.max_steps


def test_the_mixed_continuation_is_step_8s_recipe_on_both_renders():
    """default_unet_mixed.yaml continues step 8 with its recipe on two '::'-joined renders of the
    same objects, as generated and upright; it differs from the upright continuation only in its
    data, length and seeds."""
    from dataclasses import replace

    upright = load_config(TrainConfig, CONFIGS / "default_unet_upright.yaml")
    mixed = load_config(TrainConfig, CONFIGS / "default_unet_mixed.yaml")
    assert mixed.stage == upright.stage and mixed.ema == upright.ema and mixed.init == upright.init
    assert mixed.optim == replace(upright.optim, max_steps=mixed.optim.max_steps, decay_steps=mixed.optim.max_steps)
    generated, up = mixed.data.folders.split("::")
    assert generated != up and "upright" in up and "upright" not in generated
    assert mixed.data.seed not in (upright.data.seed, 6) and mixed.runtime.seed == mixed.data.seed
    assert mixed.runtime.output_dir != upright.runtime.output_dir


def test_view_embedding_scale_starts_where_configured(tmp_path):
    """0 keeps a new model equal to its base (the design); a from-scratch run may start at 1;
    a bundle keeps its trained scale, so setting one there is refused."""
    from dataclasses import replace

    from train.config import ModelInitConfig
    from train.models import build_mvdiff_model

    for scale in (0.0, 1.0):
        model = build_mvdiff_model(ModelInitConfig(view_embedding_scale=scale), PredictionType.EPSILON)
        assert model.unet.unet.class_embedding.scale.item() == scale
    bundle = replace(ModelInitConfig(), source=InitSource.BUNDLE, path=str(tmp_path / "x.safetensors"),
                     view_embedding_scale=1.0)
    with pytest.raises(ValueError, match="view_embedding_scale=1.0 applies to new models"):
        build_mvdiff_model(bundle, PredictionType.EPSILON)


@pytest.mark.parametrize("script,config,override,message", [
    ("train_mvdiff.py", "default_unet.yaml", "optim.max_minutes=-1",
     "optim.max_minutes=-1.0 is not allowed; allowed: >= 0"),
    # loads, but cannot run: the shipped default already has the epipolar bias step 5 would switch on
    ("train_mvdiff.py", "default_unet_5.yaml",
     "data.folders={data} init.path=models/mvdpp_default.safetensors runtime.output_dir={tmp}",
     "already has epipolar attention, whose gains it keeps; leave init.epipolar_gain at 0"),
    ("train_mvae.py", "default_mvae.yaml", "optim.nope=1", "unknown key(s) ['nope'] in optim"),
    # the files and folders a config names: checked before any model is built, each error naming its key
    ("train_mvdiff.py", "default_unet_8.yaml", "data.folders={tmp}/none runtime.output_dir={tmp}",
     "data.folders='{tmp}/none': data folder {tmp}/none does not exist; render objects there first"),
    ("train_mvdiff.py", "default_unet_8.yaml", "data.folders={empty} runtime.output_dir={tmp}",
     "holds no object folders; render objects there first"),
    ("train_mvdiff.py", "default_unet_8.yaml",
     "data.folders={data} init.path={tmp}/model.safetensors runtime.output_dir={tmp}",
     "init.path={tmp}/model.safetensors does not exist; set it to the previous stage's exported .safetensors bundle"),
    ("train_mvdiff.py", "default_unet_8.yaml",
     "data.folders={data} init.path=models/mvdpp_default.safetensors init.mvae_path={tmp}/mvae.safetensors "
     "runtime.output_dir={tmp}",
     "init.mvae_path={tmp}/mvae.safetensors does not exist; set it to an MVAE file"),
    ("train_mvdiff.py", "default_unet_8.yaml",
     "data.folders={data} init.path=README.md init.mvae_path=models/mvdpp_default.safetensors runtime.output_dir={tmp}",
     "init.path=README.md: "),
    ("train_mvae.py", "default_mvae_4.yaml",
     "data.folders={data} init.path={tmp}/mvae.safetensors runtime.output_dir={tmp}",
     "init.path={tmp}/mvae.safetensors does not exist; set it to an MVAE file"),
    ("train_mvae.py", "default_mvae_4.yaml", "data.folders={tmp}/none runtime.output_dir={tmp}",
     "data.folders='{tmp}/none': data folder {tmp}/none does not exist"),
])
def test_the_trainers_refuse_a_bad_config_in_one_line_without_a_traceback(script, config, override, message, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "data" / "object_0").mkdir(parents=True)  # an object folder (read only once training starts)
    (tmp_path / "empty").mkdir()
    names = {"tmp": tmp_path / "run", "data": tmp_path / "data", "empty": tmp_path / "empty"}
    message = message.format(**names)
    cmd = [sys.executable, str(repo / "train" / script), "--config", str(repo / "train" / "configs" / config)]
    for item in override.format(**names).split():
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: ") and message in proc.stderr
