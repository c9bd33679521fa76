"""CLIP image embeddings: one token per condition view, loaded only from local files."""

import pytest
import torch
from safetensors.torch import save_file

from mvdpp_core.config import preset
from mvdpp_core.image_encoder import ImageEncoder


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(preset("tiny").image_encoder).eval()


@torch.no_grad()
def test_one_embedding_per_view_each_view_independent(encoder):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = encoder(images)
    assert out.shape == (3, 32)
    assert (encoder(images[[1, 0, 2]]) - out[[1, 0, 2]]).abs().max() < 1e-5
    torch.testing.assert_close(encoder(images[:1]), out[:1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_loads_from_a_local_folder_and_a_single_file(encoder, tmp_path):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    encoder.model.save_pretrained(tmp_path / "clip")
    from_folder = ImageEncoder.from_local(tmp_path / "clip").eval()
    assert from_folder.config == encoder.config
    torch.testing.assert_close(from_folder(images), encoder(images))
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    from_file = ImageEncoder.from_local(tmp_path / "clip.safetensors", num_attention_heads=4).eval()
    assert from_file.config == encoder.config
    torch.testing.assert_close(from_file(images), encoder(images))


def test_bad_local_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a .safetensors file nor a transformers CLIP vision folder"):
        ImageEncoder.from_local(tmp_path)
    (tmp_path / "clip.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="never pickles"):
        ImageEncoder.from_local(tmp_path / "clip.bin")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a CLIP vision model with projection"):
        ImageEncoder.from_local(tmp_path / "other.safetensors")
