"""The single-file safetensors bundle and the SD 2 inpainting converter."""

import json
import pickle

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

from mvdpp_core.checkpoint import convert_sd2_inpainting, load_checkpoint, read_metadata, save_checkpoint
from mvdpp_core.config import ModelConfig, preset


def test_save_load_is_bit_exact_and_records_the_architecture(tmp_path):
    model = tiny_model(seed=3, view_scale=0.25)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    meta = read_metadata(path)
    assert meta["format"] == "mvdpp" and meta["format_version"] == "1"
    assert ModelConfig.from_json(meta["config"]) == model.config
    assert json.loads(meta["rig"])["elevations_deg"] == [-30, 0, 30, 60]
    loaded = load_checkpoint(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = load_file(str(path)).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "vae", "image_encoder"}
    assert not list(tmp_path.glob(".*tmp")), "the atomic write left a temp file"


def test_pickled_files_are_refused(tmp_path):
    ckpt = tmp_path / "weights.ckpt"
    ckpt.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="pickle-based checkpoint.*never loaded"):
        load_checkpoint(ckpt)
    disguised = tmp_path / "weights.safetensors"
    torch.save({"a": torch.zeros(1)}, disguised)
    with pytest.raises(ValueError, match="pickled .*refused"):
        load_checkpoint(disguised)


def test_corrupt_and_foreign_files_are_reported(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an MVDiffusion\\+\\+ bundle"):
        load_checkpoint(foreign)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_config_mismatch_is_reported_clearly(tmp_path):
    path = save_checkpoint(tiny_model(), tmp_path / "m.safetensors")
    tensors = load_file(str(path))
    meta = read_metadata(path)
    config = json.loads(meta["config"])
    config["unet"]["block_out_channels"] = [32, 64]
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(ValueError, match=r"does not match its architecture config.*file \(64,.*vs config \(32,"):
        load_checkpoint(path)
    config["unet"]["channels"] = 3
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['channels'\]"):
        load_checkpoint(path)


@pytest.fixture
def sd2_inpainting_folder(tmp_path):
    """A tiny Stable Diffusion 2 inpainting model in diffusers folder layout."""
    torch.manual_seed(0)
    tiny = preset("tiny")
    unet = UNet2DConditionModel(**tiny.unet.diffusers_kwargs()).eval()
    vae = AutoencoderKL(**{**tiny.vae.diffusers_kwargs(), "in_channels": 3, "out_channels": 3}).eval()
    unet.save_pretrained(tmp_path / "sd2inp" / "unet")
    vae.save_pretrained(tmp_path / "sd2inp" / "vae")
    return tmp_path / "sd2inp", unet, vae


@torch.no_grad()
def test_sd2_inpainting_folder_converts_and_reproduces_the_base_per_view(sd2_inpainting_folder, tmp_path):
    folder, base_unet, base_vae = sd2_inpainting_folder
    model = convert_sd2_inpainting(folder, image_size=64).eval()
    assert model.image_encoder is None
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(3, 9, 8, 8, generator=g)
    t = torch.tensor([5, 500, 990])
    ctx = torch.randn(3, 1, 32, generator=g)
    model.unet.set_attention_backend("sdpa", global_attention=False)
    ours = model.unet(sample[None], t[None], torch.arange(3)[None], ctx[None].expand(1, 3, 1, 32)[:, 0])
    ref = base_unet(sample, t, encoder_hidden_states=ctx[:1].expand(3, 1, 32)).sample
    torch.testing.assert_close(ours[0], ref, atol=1e-5, rtol=1e-5)
    image = torch.rand(2, 3, 32, 32, generator=g)
    latents = model.vae.encode(image, torch.ones(2, 1, 32, 32))
    ref_latents = base_vae.encode(image * 2 - 1).latent_dist.mode() * base_vae.config.scaling_factor
    torch.testing.assert_close(latents, ref_latents, atol=1e-5, rtol=1e-5)
    # ... and the converted model round-trips through the bundle (without an image encoder).
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "converted.safetensors"))
    assert loaded.image_encoder is None and loaded.config == model.config


def test_converter_refuses_non_inpainting_unets(sd2_inpainting_folder, tmp_path):
    folder, base_unet, _ = sd2_inpainting_folder
    txt2img = UNet2DConditionModel(**{**preset("tiny").unet.diffusers_kwargs(), "in_channels": 4})
    txt2img.save_pretrained(folder / "unet")
    with pytest.raises(ValueError, match="4 input channels.*inpainting UNet"):
        convert_sd2_inpainting(folder)
    with pytest.raises(ValueError, match="not a diffusers folder"):
        convert_sd2_inpainting(tmp_path)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'huge'; allowed: \\['sd2', 'tiny'\\]"):
        preset("huge")



def test_a_safetensors_header_length_with_a_pickle_like_low_byte_loads(tmp_path):
    """The u64 header length may start with byte 0x80 (pickle's protocol mark): still safetensors."""
    model = tiny_model()
    for pad in range(300):  # grow the metadata until the header length's low byte is 0x80
        path = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_metadata(path)["pad"] == "x" * pad
