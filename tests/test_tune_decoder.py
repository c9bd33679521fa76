"""train/tune_decoder.py: the pairs are what the sampler decodes, the fit lowers the loss on them
and changes nothing but the decoder side, and the bundle written loads with its settings recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mvdpp_core.checkpoint import load_checkpoint, read_metadata
from mvdpp_core.common import composite_on_white, straight_colours
from mvdpp_core.condition import ConditionViews
from mvdpp_core.pipeline import generate
from train.data import format as fmt
from train.data.dataset import to_tensors
from train.procedural.render import write_object
from train.tune_decoder import TuneConfig, capture, decoder_loss, main, tune_decoder

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "mvdpp_default.safetensors"
DECODER_SIDE = ("vae.decoder.", "vae.post_quant_conv.")


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    for i in range(2):
        write_object(root, "train", i)
    return root


def test_capture_keeps_the_latents_the_sampler_decodes(objects):
    model = load_checkpoint(BUNDLE)
    cfg = TuneConfig(objects=1, seed=7)
    latents, rgba = capture(model, sorted(objects.iterdir())[:1], cfg, log=lambda _: None)
    assert latents.shape == (1, 32, 4, 16, 16) and rgba.shape == (1, 32, 4, 64, 64)
    views = fmt.read_object_folder(sorted(objects.iterdir())[0], cond_ids=[0])
    cond_rgb, cond_mask = to_tensors(views.cond_rgba, 64)
    result = generate(model, ConditionViews.framed(cond_rgb, cond_mask), seed=7, steps=2, sampler="ddim", guidance=2.0)
    with torch.no_grad():
        rgb, mask = model.vae.decode(latents[0].float())
    # The latents are kept in fp16; generate keeps the decoded views' straight colours. Compare them
    # on white: straight colours divide by the mask (up to 1 / STRAIGHT_MASK_FLOOR = 20x), so an
    # fp16 rounding on a faint outline pixel would decide the test, not the latents kept.
    kept = composite_on_white(straight_colours(rgb, mask), mask)
    torch.testing.assert_close(kept, result.on_white(), atol=2e-2, rtol=0)
    torch.testing.assert_close(mask, result.masks, atol=2e-2, rtol=0)
    true_rgb, true_mask = to_tensors(views.target_rgba, 64)
    torch.testing.assert_close(rgba[0, :, :3].float() / 255, true_rgb, atol=1 / 255, rtol=0)
    torch.testing.assert_close(rgba[0, :, 3:].float() / 255, true_mask, atol=1 / 255, rtol=0)


def test_fit_lowers_the_loss_and_changes_only_the_decoder(objects, tmp_path):
    cfg = TuneConfig(objects=2, fit_steps=30, batch_views=8, lr=1e-3)
    out = tune_decoder(BUNDLE, objects, tmp_path / "tuned.safetensors", cfg, log=lambda _: None)
    before, after = load_checkpoint(BUNDLE), load_checkpoint(out)
    latents, rgba = capture(before, sorted(objects.iterdir()), cfg, log=lambda _: None)
    z, x = latents.flatten(0, 1).float(), rgba.flatten(0, 1).float() / 255 * 2 - 1
    with torch.no_grad():
        losses = [float(decoder_loss(m, z, x)) for m in (before, after)]
    assert losses[1] < 0.9 * losses[0], losses
    old = {f"{p}.{k}": v for p, m in (("unet", before.unet.unet), ("vae", before.vae.vae),
                                      ("image_encoder", before.image_encoder.model)) for k, v in m.state_dict().items()}
    new = {f"{p}.{k}": v for p, m in (("unet", after.unet.unet), ("vae", after.vae.vae),
                                      ("image_encoder", after.image_encoder.model)) for k, v in m.state_dict().items()}
    assert old.keys() == new.keys()
    moved = {k for k in old if not torch.equal(old[k], new[k])}
    assert moved and all(k.startswith(DECODER_SIDE) for k in moved), sorted(moved)[:3]
    meta = read_metadata(out)
    assert meta["training_stage"] == read_metadata(BUNDLE)["training_stage"]
    assert json.loads(meta["decoder_tuned"])["fit_steps"] == 30


def test_bad_arguments_are_refused(objects, tmp_path, capsys):
    assert main(["--bundle", str(BUNDLE), "--data", str(objects), "--out", str(tmp_path / "x.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    empty = ["--bundle", str(BUNDLE), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")]
    assert main(empty) == 2
    assert "holds no object folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--bundle", str(BUNDLE), "--data", str(objects), "--out", str(tmp_path / "x.safetensors"),
              "--fit-steps", "0"])
    assert "--fit-steps 0: give 1 or more" in capsys.readouterr().err


def test_captured_pairs_are_reused_only_for_the_same_bundle_objects_and_settings(objects, tmp_path, monkeypatch):
    import train.tune_decoder as tune

    model, folders, pairs = load_checkpoint(BUNDLE), sorted(objects.iterdir())[:1], tmp_path / "pairs.safetensors"
    calls = []
    real = tune.capture
    monkeypatch.setattr(tune, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    quiet = {"log": lambda _: None}
    first = tune.captured_pairs(model, folders, TuneConfig(), pairs, bundle_digest="a", **quiet)
    again = tune.captured_pairs(model, folders, TuneConfig(), pairs, bundle_digest="a", **quiet)
    assert len(calls) == 1 and all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    tune.captured_pairs(model, folders, TuneConfig(seed=1), pairs, bundle_digest="a", **quiet)
    tune.captured_pairs(model, folders, TuneConfig(seed=1), pairs, bundle_digest="b", **quiet)
    assert len(calls) == 3
