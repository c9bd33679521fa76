"""How a checkpoint is sampled when the caller names no sampling: bundles of the default recipe as
the embedded default (2 ddim steps, averaged), every other one with the long sampler, in the demo,
batch generation, the evaluation and the sampler node alike."""

from __future__ import annotations

import shutil

import pytest
import torch

from mvdpp_core import MVDPPModel, preset, save_checkpoint
from mvdpp_core.batch import batch_settings, parse_args
from mvdpp_core.sampling_defaults import (
    CHECKPOINT_SAMPLING,
    EMBEDDED_CHECKPOINT,
    EMBEDDED_PARTNER,
    EMBEDDED_SAMPLING,
    default_sampling,
    ensemble_partners,
    is_recipe_model,
    resolve_partners,
)


@pytest.fixture(scope="module")
def staged_bundles(tmp_path_factory) -> dict[str, object]:
    """The same tiny model saved as a default-recipe export and as a stage-3 export."""
    torch.manual_seed(0)
    model = MVDPPModel(preset("tiny"))
    folder = tmp_path_factory.mktemp("staged")
    return {stage: save_checkpoint(model, folder / f"{stage}.safetensors", metadata={"training_stage": stage})
            for stage in ("default", "stage3")}


def test_recipe_bundles_are_sampled_as_the_embedded_default(staged_bundles, tiny_checkpoint, tmp_path):
    assert EMBEDDED_SAMPLING != CHECKPOINT_SAMPLING
    assert default_sampling(None) == EMBEDDED_SAMPLING  # no checkpoint: the embedded default
    assert default_sampling(EMBEDDED_CHECKPOINT) == EMBEDDED_SAMPLING
    copy = shutil.copy(EMBEDDED_CHECKPOINT, tmp_path / "renamed.safetensors")  # e.g. into models/mvdpp/
    assert default_sampling(copy) == EMBEDDED_SAMPLING
    assert default_sampling(staged_bundles["default"]) == EMBEDDED_SAMPLING  # a train_default.py export
    assert default_sampling(staged_bundles["stage3"]) == CHECKPOINT_SAMPLING
    assert default_sampling(tiny_checkpoint) == CHECKPOINT_SAMPLING  # no training stage recorded
    assert not is_recipe_model(tmp_path / "missing.safetensors")  # loading it will say what is wrong
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a bundle")
    assert default_sampling(broken) == CHECKPOINT_SAMPLING


def test_only_the_embedded_default_has_a_partner(staged_bundles, tmp_path):
    """The embedded default (None stands for it) averages with its shipped partner; a copy of it
    elsewhere, a recipe export and any other bundle have none unless a --partner flag names one,
    and --partner alone names none."""
    assert EMBEDDED_PARTNER.is_file() and EMBEDDED_PARTNER.parent == EMBEDDED_CHECKPOINT.parent
    assert ensemble_partners(None) == ensemble_partners(EMBEDDED_CHECKPOINT) == (EMBEDDED_PARTNER,)
    copy = tmp_path / EMBEDDED_CHECKPOINT.name
    shutil.copy(EMBEDDED_CHECKPOINT, copy)
    for other in (copy, staged_bundles["default"], staged_bundles["stage3"], tmp_path / "missing.safetensors"):
        assert ensemble_partners(other) == (), other
    assert resolve_partners(None, None) == (EMBEDDED_PARTNER,)
    assert resolve_partners(None, []) == ()
    assert resolve_partners(copy, [EMBEDDED_PARTNER]) == (EMBEDDED_PARTNER,)


def test_given_fields_replace_the_defaults_and_unknown_ones_are_refused():
    chosen = default_sampling(None, steps=20, sampler="dpmpp_2m", cfg=None, average_seeds=1)
    assert chosen == EMBEDDED_SAMPLING._replace(steps=20, sampler="dpmpp_2m", average_seeds=1)
    assert chosen.cfg == EMBEDDED_SAMPLING.cfg  # None keeps the default
    with pytest.raises(TypeError, match=r"unknown sampling fields \['guidance'\]; allowed: sampler, steps, cfg"):
        default_sampling(None, guidance=2.0)


def test_batch_generation_samples_each_checkpoint_as_the_demo_does(staged_bundles, tmp_path):
    common = ["--inputs", str(tmp_path), "--out", str(tmp_path / "out")]
    embedded = batch_settings(parse_args(common))  # the embedded default, the batch's default checkpoint
    assert (embedded.sampler, embedded.steps, embedded.guidance, embedded.mirror_average, embedded.average_seeds,
            embedded.input_average) == EMBEDDED_SAMPLING
    other = batch_settings(parse_args([*common, "--checkpoint", str(staged_bundles["stage3"])]))
    assert (other.sampler, other.steps, other.guidance, other.mirror_average, other.average_seeds,
            other.input_average) == CHECKPOINT_SAMPLING
    given = batch_settings(parse_args([*common, "--steps", "4", "--no-mirror", "--average-seeds", "3"]))
    assert (given.steps, given.mirror_average, given.average_seeds, given.sampler) == (4, False, 3, "ddim")
    with pytest.raises(SystemExit):
        parse_args([*common, "--average-seeds", "0"])


def test_the_scripts_refuse_a_checkpoint_flag_that_names_no_bundle_before_any_work(staged_bundles, tmp_path, capsys):
    """The demo, batch generation and the evaluation read --checkpoint and --partner's headers while
    parsing: a missing file, a folder, a pickle or a file that is not a bundle ends the command with
    one argparse line naming the flag, not a traceback after the held-out set or the inputs are read."""
    from mvdpp_core.sampling_defaults import checkpoint_flags_error
    from scripts import demo, eval_default

    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    not_bundle = tmp_path / "notes.safetensors"
    not_bundle.write_text("not a safetensors file")
    bundle = str(staged_bundles["stage3"])
    assert checkpoint_flags_error(EMBEDDED_CHECKPOINT, [EMBEDDED_PARTNER]) is None
    assert checkpoint_flags_error(None, None) is None and checkpoint_flags_error(bundle, []) is None
    refused = {tmp_path / "missing.safetensors": "no such file; give a model bundle",
               tmp_path: "is a directory, not a file", pickle: "pickle-based checkpoint",
               not_bundle: "not a valid safetensors file"}
    for path, reason in refused.items():
        message = checkpoint_flags_error(path, None)
        assert message.startswith(f"--checkpoint {path}: ") and reason in message
        assert checkpoint_flags_error(bundle, [EMBEDDED_PARTNER, path]).startswith(f"--partner {path}: ")
    missing = str(tmp_path / "missing.safetensors")
    commands = [
        (demo.parse_args, []),
        (parse_args, ["--inputs", str(tmp_path), "--out", str(tmp_path / "out")]),
        (eval_default.parse_args, ["--heldout", str(tmp_path / "heldout"), "--out", str(tmp_path / "e.json")]),
    ]
    for parse, common in commands:
        for flags in (["--checkpoint", missing], ["--partner", missing]):
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_info:
                parse([*common, *flags])
            assert exit_info.value.code == 2
            assert f"error: {flags[0]} {missing}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "heldout").exists() and not (tmp_path / "out").exists()
