"""The single-file checkpoint bundle, and conversion from Stable Diffusion 2 inpainting.

Format (version 1): one ``.safetensors`` file. Tensors are prefixed ``unet.``, ``vae.`` and
(optionally) ``image_encoder.``, each followed by the diffusers / transformers state-dict
key of that component. The metadata holds JSON strings: ``config`` (``ModelConfig``, which
includes prediction type and schedule), ``rig`` (the camera rig) and ``format`` /
``format_version``. Loading never unpickles: only safetensors is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import cameras
from .config import ModelConfig, UNetConfig
from .image_encoder import ImageEncoder
from .model import MVDPPModel
from .unet import MultiViewUNet
from .vae import MaskAwareVAE

FORMAT_NAME = "mvdpp"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_PREFIXES = ("unet", "vae", "image_encoder")


def rig_metadata() -> dict:
    return {
        "elevations_deg": list(cameras.ELEVATIONS_DEG),
        "azimuths_deg": list(cameras.AZIMUTHS_DEG),
        "distance": cameras.TARGET_DISTANCE,
        "fov_deg": cameras.FOV_DEG,
        "convention": "opencv_c2w_z_up",
    }


def _components(model: MVDPPModel) -> dict[str, nn.Module]:
    parts: dict[str, nn.Module] = {"unet": model.unet.unet, "vae": model.vae.vae}
    if model.image_encoder is not None:
        parts["image_encoder"] = model.image_encoder.model
    return parts


def model_state_dict(model: MVDPPModel) -> dict[str, Tensor]:
    """The bundle's tensors: ``<component>.<key>``, contiguous, on the CPU."""
    return {
        f"{prefix}.{key}": value.detach().to("cpu").contiguous()
        for prefix, module in _components(model).items()
        for key, value in module.state_dict().items()
    }


def save_checkpoint(model: MVDPPModel, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the bundle atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path {path} must end in .safetensors.")
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": model.config.to_json(),
        "rig": json.dumps(rig_metadata()),
        **(metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(model_state_dict(model), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickle-based checkpoint ({path.suffix}); pickles can run arbitrary code "
            "and are never loaded. Convert it to .safetensors (mvdpp_core.checkpoint.save_checkpoint "
            "after loading it yourself in a trusted environment)."
        )
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with a u64 header length and its JSON header ('{'); test that
    # first, since the length's low byte may be anything, pickle's 0x80 protocol mark included.
    header_len = int.from_bytes(head[:8], "little")
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 8 + header_len <= path.stat().st_size
    if not looks_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise ValueError(
            f"{path.name} holds pickled (torch.save) data despite its name; it is refused. "
            "Re-save the weights with safetensors."
        )


def read_metadata(path: str | Path) -> dict[str, str]:
    """The bundle's metadata, after checking the file is a readable safetensors bundle."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; put .safetensors bundles in models/mvdpp/.")
    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path.name} is not a valid safetensors file ({err}); the file may be truncated or corrupt."
        ) from None
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path.name} is a safetensors file but not an MVDiffusion++ bundle (metadata format="
            f"{meta.get('format')!r}); convert SD 2 inpainting weights with convert_sd2_inpainting first."
        )
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path.name} has format version {version}; this code reads up to {FORMAT_VERSION}. Update the node pack."
        )
    return meta


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> MVDPPModel:
    """Rebuild the model from a bundle's config and load its tensors (strictly)."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        config = ModelConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path.name}: the stored architecture config is unreadable ({err}).") from None
    tensors = load_file(str(path))
    has_encoder = any(k.startswith("image_encoder.") for k in tensors)
    model = MVDPPModel(config, with_image_encoder=has_encoder)
    load_model_state(model, tensors, source=path.name)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_model_state(model: MVDPPModel, tensors: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load bundle tensors into ``model``; report missing, unexpected and mis-shaped keys."""
    problems: list[str] = []
    tensors = _upgrade_view_scale(tensors)
    for prefix, module in _components(model).items():
        expected = module.state_dict()
        given = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        shapes = [
            f"{prefix}.{k}: file {tuple(given[k].shape)} vs config {tuple(expected[k].shape)}"
            for k in sorted(set(given) & set(expected))
            if given[k].shape != expected[k].shape
        ]
        problems += [f"missing {prefix}.{k}" for k in missing[:5]] + [
            f"unexpected {prefix}.{k}" for k in unexpected[:5]
        ]
        problems += shapes[:5]
        if not problems:
            module.load_state_dict(given, strict=True)
    stray = sorted({k.split(".")[0] for k in tensors} - set(_components(model)))
    problems += [f"unexpected component '{p}'" for p in stray]
    if problems:
        raise ValueError(
            f"{source} does not match its architecture config ({len(problems)} problem(s), first: "
            f"{'; '.join(problems[:6])}). The file was saved from a different model shape; re-export it "
            "with save_checkpoint from the model that trained it."
        )


def _upgrade_view_scale(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bundles written before the view-index scale became shape (1,) (FSDP2 refuses 0-dim
    parameters) hold it 0-dim; read it as (1,)."""
    key = "unet.class_embedding.scale"
    if key in tensors and tensors[key].ndim == 0:
        return {**tensors, key: tensors[key].reshape(1)}
    return tensors


def convert_sd2_inpainting(
    path: str | Path, *, image_encoder_path: str | Path | None = None, image_size: int = 512
) -> MVDPPModel:
    """Initialise an MVDiffusion++ model from local Stable Diffusion 2 inpainting weights.

    Args:
        path: a diffusers folder (``unet/`` and ``vae/`` subfolders) or a single-file
            ``.safetensors`` checkpoint in the original (LDM) layout.
        image_encoder_path: optional transformers CLIP vision folder (OpenCLIP ViT-H/14).
        image_size: training image size (the UNet's latents are ``image_size / 8``).
    Returns:
        The model: UNet = SD2 inpainting UNet with view embeddings (scale 0) and global
        attention; VAE = the SD VAE made mask-aware. Never downloads anything.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    if path.is_dir():
        for sub in ("unet", "vae"):
            if not (path / sub / "config.json").is_file():
                raise ValueError(f"{path} is not a diffusers folder: {sub}/config.json is missing.")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        rgb_vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    elif path.is_file():
        unet, rgb_vae = _load_ldm_single_file(path)
    else:
        raise ValueError(f"{path} does not exist; give a local SD 2 inpainting folder or .safetensors file.")
    if unet.config.in_channels != 9:
        raise ValueError(
            f"the UNet at {path} has {unet.config.in_channels} input channels; MVDiffusion++ starts from an "
            "inpainting UNet (9 channels), e.g. stabilityai/stable-diffusion-2-inpainting."
        )
    encoder = ImageEncoder.from_local(image_encoder_path) if image_encoder_path is not None else None
    unet_config = _unet_config_from_diffusers(unet.config)
    vae = MaskAwareVAE.from_rgb_vae(rgb_vae)
    base = ModelConfig()
    config = ModelConfig(
        unet=unet_config,
        vae=vae.config,
        # Without a bundled encoder, embeddings come from outside (e.g. ComfyUI's CLIP vision)
        # and only their width must match the UNet.
        image_encoder=encoder.config
        if encoder is not None
        else dataclasses.replace(base.image_encoder, projection_dim=unet_config.cross_attention_dim),
        schedule=base.schedule,
        image_size=image_size,
    )
    return MVDPPModel(
        config,
        unet=MultiViewUNet(unet_config, unet),
        vae=vae,
        image_encoder=encoder,
        with_image_encoder=encoder is not None,
    )


def _unet_config_from_diffusers(c) -> UNetConfig:
    head_dim = c.attention_head_dim
    head_dim = tuple(head_dim) if isinstance(head_dim, (list, tuple)) else (head_dim,) * len(c.block_out_channels)
    return UNetConfig(
        sample_size=c.sample_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        attention_head_dim=head_dim,
        cross_attention_dim=c.cross_attention_dim,
        norm_num_groups=c.norm_num_groups,
        use_linear_projection=c.use_linear_projection,
        down_block_types=tuple(c.down_block_types),
        up_block_types=tuple(c.up_block_types),
    )


def _load_ldm_single_file(path: Path):
    """UNet and VAE from an original-layout SD 2 inpainting .safetensors, with the sd2 preset shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    _check_not_pickle(path)
    try:
        checkpoint = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path.name} is not a readable safetensors file ({err}).") from None
    preset = ModelConfig()
    unet_kwargs = preset.unet.diffusers_kwargs()
    vae_kwargs = {**preset.vae.diffusers_kwargs(), "in_channels": 3, "out_channels": 3}
    unet = UNet2DConditionModel(**unet_kwargs)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet.config))
    rgb_vae = AutoencoderKL(**vae_kwargs)
    rgb_vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, rgb_vae.config))
    return unet, rgb_vae
