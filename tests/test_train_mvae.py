"""train_mvae.py: SD-VAE conversion as the starting point, training lowers the loss, the export
holds the EMA weights and is what the UNet trainer takes as its VAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from mvdpp_core.checkpoint import load_mvae
from mvdpp_core.config import PredictionType
from train.config import ModelInitConfig, MVAEInitConfig, MVAEInitSource, MVAETrainConfig, load_config
from train.data.synthetic import write_synthetic_dataset
from train.models import build_mvae, build_mvdiff_model
from train.train_mvae import train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train" / "configs" / "tiny_cpu_mvae.yaml"


def test_sd_vae_folder_converts_to_an_mvae_equal_on_rgb(tmp_path):
    torch.manual_seed(0)
    rgb_vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8,
        layers_per_block=1,
    )
    rgb_vae.save_pretrained(tmp_path / "sd" / "vae")
    mvae, size = build_mvae(MVAEInitConfig(source=MVAEInitSource.SD_VAE, path=str(tmp_path / "sd")))
    assert size == 512
    image = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = rgb_vae.decode(rgb_vae.encode(image * 2 - 1).latent_dist.mode()).sample
        rgb, mask = mvae.decode(mvae.encode(image, torch.zeros(2, 1, 16, 16)))
    torch.testing.assert_close(rgb, ((expected + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    assert (mask == 1).all()  # before fine-tuning the mask decodes to "foreground"


def test_mvae_training_lowers_the_loss_and_exports_the_ema(tmp_path):
    data = tmp_path / "objects"
    write_synthetic_dataset(data, num_objects=3, image_size=32, num_cond=2, seed=5)
    out = tmp_path / "mvae"
    cfg = load_config(
        MVAETrainConfig,
        CONFIG,
        [
            f"data.folders={data}",
            f"runtime.output_dir={out}",
            "optim.lr=2e-3",
            "optim.max_steps=12",
            "logging.tensorboard=false",
            "ema.decay=0.5",
        ],
    )
    state = train(cfg)
    assert sum(state.losses[-3:]) / 3 < 0.8 * sum(state.losses[:3]) / 3
    exported = load_mvae(out / "export" / "mvae.safetensors")
    ema = load_file(str(out / "checkpoints" / "step_00000012" / "ema.safetensors"))
    for name, value in exported.vae.named_parameters():
        torch.testing.assert_close(value, ema[f"mvae.vae.{name}"])
    unet_model = build_mvdiff_model(
        ModelInitConfig(mvae_path=str(out / "export" / "mvae.safetensors"), image_size=32), PredictionType.EPSILON
    )
    for name, value in unet_model.vae.vae.named_parameters():
        torch.testing.assert_close(value, ema[f"mvae.vae.{name}"])


def test_mvae_file_is_checked(tmp_path):
    with pytest.raises(ValueError, match="must be an existing .safetensors written by train_mvae.py"):
        load_mvae(tmp_path / "nope.safetensors")


def test_a_model_bundle_serves_as_the_mvae_of_a_new_run(tmp_path):
    """init.mvae_path may name a model bundle: the new run is exactly the run started from the
    MVAE file of that bundle's VAE (weights and config, scaling factor included), and it takes
    nothing else of the bundle (its UNet starts fresh)."""
    from safetensors.torch import save_file

    from mvdpp_core.checkpoint import load_checkpoint, save_mvae

    bundle = REPO / "models" / "mvdpp_default.safetensors"
    source = load_checkpoint(bundle)
    save_mvae(source.vae, tmp_path / "mvae.safetensors")
    built = [
        build_mvdiff_model(ModelInitConfig(mvae_path=str(path), image_size=64), PredictionType.V_PREDICTION)
        for path in (bundle, tmp_path / "mvae.safetensors")
    ]
    assert built[0].config == built[1].config and built[0].config.vae == source.config.vae
    theirs = built[1].state_dict()
    for name, value in built[0].state_dict().items():
        assert torch.equal(value, theirs[name]), name
    vae = source.vae.vae.state_dict()
    assert all(torch.equal(v, vae[k]) for k, v in built[0].vae.vae.state_dict().items())
    shipped = source.unet.state_dict()
    assert any(not torch.equal(v, shipped[k]) for k, v in built[0].unet.state_dict().items() if k in shipped)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="neither an MVAE file nor a model bundle .*format='other'"):
        load_mvae(tmp_path / "other.safetensors")


def test_a_decoder_trained_with_the_encoder_fixed_replaces_the_bundles(tmp_path):
    """init.train_encoder=false trains the decoder only: the export's encoder side is bit for bit
    the bundle's, so every latent (and the UNet trained on them) stays valid, and
    train.replace_decoder puts the new decoder into the bundle, refusing an MVAE whose encoder moved."""
    from mvdpp_core.checkpoint import load_checkpoint, read_metadata, save_mvae
    from train.replace_decoder import ENCODER_SIDE, main, replace_decoder

    bundle = REPO / "models" / "mvdpp_default.safetensors"
    data = tmp_path / "objects"
    write_synthetic_dataset(data, num_objects=2, image_size=64, num_cond=1, seed=3)
    out = tmp_path / "mvae"
    overrides = [f"data.folders={data}", f"runtime.output_dir={out}", "optim.max_steps=3", "optim.batch_size=1",
                 "logging.tensorboard=false", "checkpoint.every=3", "optim.lr=1e-3"]
    train(load_config(MVAETrainConfig, REPO / "train" / "configs" / "default_mvae_3.yaml", overrides))
    source, trained = load_checkpoint(bundle).vae.vae.state_dict(), load_mvae(out / "export" / "mvae.safetensors")
    after = trained.vae.state_dict()
    encoder = [k for k in source if k.startswith(ENCODER_SIDE)]
    assert encoder and all(torch.equal(source[k], after[k]) for k in encoder)
    assert any(not torch.equal(source[k], after[k]) for k in source if k.startswith("decoder."))

    replaced = replace_decoder(bundle, out / "export" / "mvae.safetensors", tmp_path / "new.safetensors")
    new, old = load_checkpoint(replaced), load_checkpoint(bundle)
    assert all(torch.equal(v, after[k]) for k, v in new.vae.vae.state_dict().items())
    assert all(torch.equal(v, old.unet.state_dict()[k]) for k, v in new.unet.state_dict().items())
    assert read_metadata(replaced)["training_stage"] == read_metadata(bundle)["training_stage"]

    trained.vae.encoder.conv_in.bias.data += 1e-3  # an encoder that moved: its latents are not the UNet's
    save_mvae(trained, tmp_path / "moved.safetensors")
    with pytest.raises(ValueError, match="encoder differs from the bundle's in 1 tensors .*train_encoder=false"):
        replace_decoder(bundle, tmp_path / "moved.safetensors", tmp_path / "bad.safetensors")
    assert main(["--bundle", str(bundle), "--mvae", str(tmp_path / "moved.safetensors"),
                 "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_random_encoder_cannot_be_frozen():
    with pytest.raises(ValueError, match="init.train_encoder=False with init.source=preset"):
        load_config(MVAETrainConfig, CONFIG, ["init.train_encoder=false"])


def test_the_foreground_term_weighs_an_objects_colour_by_its_own_pixels_not_the_views():
    """loss.foreground_weight adds the mean L1 + L2 of RGB over the true foreground: the same
    colour error counts the same on a 4-pixel object as on a 256-pixel one (the whole-view terms
    shrink 64x with it), an error on the background adds nothing, and weight 0 is the paper's loss."""
    from train.config import MVAELossConfig
    from train.train_mvae import reconstruction_loss

    def views(side: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.ones(2, 4, 32, 32)  # white, opaque where the object is, in [-1, 1]
        x[:, 3] = -1
        x[:, :3, :side, :side] = torch.tensor([0.4, -0.2, -0.6])[:, None, None]
        x[:, 3, :side, :side] = 1
        recon = x.clone()
        recon[:, :3, :side, :side] += 0.3  # a wrong colour on the object only
        return recon, x

    paper, weighted = MVAELossConfig(), MVAELossConfig(foreground_weight=2.0)
    small, large = views(2), views(16)
    extra = [reconstruction_loss(*v, weighted)[0] - reconstruction_loss(*v, paper)[0] for v in (small, large)]
    assert torch.allclose(extra[0], torch.tensor(2.0 * (0.3 + 0.09)), atol=1e-5)
    assert torch.allclose(extra[0], extra[1], atol=1e-5)
    whole = [reconstruction_loss(*v, paper)[1]["l1"] for v in (small, large)]
    assert whole[1] == pytest.approx(64 * whole[0], rel=1e-4)
    recon, x = views(4)
    recon = x.clone()
    recon[:, :3, 20:, 20:] -= 0.5  # wrong only on the background
    assert reconstruction_loss(recon, x, weighted)[1]["foreground"] == 0
    assert "foreground" not in reconstruction_loss(recon, x, paper)[1]
