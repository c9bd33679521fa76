"""The full-size ``sd2`` path on a CPU, random weights, nothing downloaded: the architecture's
parameter counts, one UNet forward over 1 condition + 2 target views at 64x64 latents (bf16
where the CPU has native bf16, else fp32), one generate step through the whole pipeline, each
within a stated memory budget; and ``convert_sd2_inpainting`` of a full-size diffusers folder
reproducing its base per view. Each check runs in a fresh process (its own peak memory).

Memory budgets (peak resident memory of the process, measured with ru_maxrss):
* forward + generate: the weights (1.58 G parameters: UNet 866 M, MVAE 84 M, ViT-H/14 632 M;
  3.2 GB in bf16) + 2 GiB for activations (3 views x 4096 tokens x <= 1280 channels with the
  flash SDPA kernel: tens of MB per tensor) and the Python / torch runtime (~0.7 GB).
* conversion: two fp32 copies of the UNet (3.5 GB each: the model and the state dict that
  ``from_pretrained`` reads into it) + 1.5 GiB (the VAE, its mask-aware copy, runtime).
"""

import json

import pytest
import torch.multiprocessing as mp
from sd2_worker import GIB, sd2_convert_round_trip, sd2_forward_and_generate

SD2_UNET_PARAMS = 865_978_885  # SD 2 inpainting UNet (865,925,124) + our 42 x 1280 view embeddings + 1 scale


def run_in_fresh_process(target, *args) -> None:
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join(timeout=900)
    assert proc.exitcode == 0, f"worker exited with {proc.exitcode}"


@pytest.mark.slow
def test_sd2_forward_and_one_generate_step_fit_their_memory_budget(tmp_path):
    run_in_fresh_process(sd2_forward_and_generate, str(tmp_path / "report.json"))
    r = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(r))
    assert r["params"]["unet"] == SD2_UNET_PARAMS
    assert 83e6 < r["params"]["vae"] < 85e6 and 630e6 < r["params"]["image_encoder"] < 635e6
    assert r["out_shape"] == [1, 3, 4, 64, 64] and r["out_finite"] and r["out_std"] > 0.01
    assert r["images_shape"] == [32, 3, 64, 64] and r["masks_shape"] == [32, 1, 64, 64] and r["result_finite"]
    budget = r["weight_bytes"] + 2 * GIB
    assert r["peak_rss_bytes"] < budget, f"peak {r['peak_rss_bytes'] / GIB:.2f} GiB > budget {budget / GIB:.2f} GiB"


@pytest.mark.slow
def test_sd2_inpainting_full_size_folder_converts_and_reproduces_the_base_per_view(tmp_path):
    run_in_fresh_process(sd2_convert_round_trip, str(tmp_path / "sd2inp"), str(tmp_path / "report.json"))
    r = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps({k: v for k, v in r.items() if k != "config_unet"}))
    assert r["unet_params"] == SD2_UNET_PARAMS
    assert r["config_unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert r["config_unet"]["attention_head_dim"] == [5, 10, 20, 20] and r["config_unet"]["cross_attention_dim"] == 1024
    assert r["unet_max_diff"] < 1e-4 * max(r["unet_ref_scale"], 1.0)
    assert r["latent_max_diff"] < 1e-4 and r["rgb_max_diff"] < 1e-4 and r["mask_min"] > 0.99
    unet_fp32 = SD2_UNET_PARAMS * 4
    budget = 2 * unet_fp32 + 1.5 * GIB
    assert r["peak_rss_bytes"] < budget, f"peak {r['peak_rss_bytes'] / GIB:.2f} GiB > budget {budget / GIB:.2f} GiB"


def test_a_bf16_image_encoder_embeds_on_the_cpu():
    """generate() with a bf16 model on a CPU once failed in the encoder's antialiased resize."""
    import torch

    from mvdpp_core.config import preset
    from mvdpp_core.image_encoder import ImageEncoder

    torch.manual_seed(0)
    encoder = ImageEncoder(preset("tiny").image_encoder).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = encoder(images)
        half = encoder.to(torch.bfloat16)(images.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.shape == ref.shape
    torch.testing.assert_close(half.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
