"""Model construction for training: initial weights per config, the MVAE file, bundle export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from mvdpp_core.checkpoint import convert_sd2_inpainting, load_checkpoint, save_checkpoint
from mvdpp_core.config import ModelConfig, PredictionType, VAEConfig, from_dict, preset, to_jsonable
from mvdpp_core.image_encoder import ImageEncoder
from mvdpp_core.model import MVDPPModel
from mvdpp_core.unet import MultiViewUNet
from mvdpp_core.vae import MaskAwareVAE

from .config import InitSource, ModelInitConfig, MVAEInitConfig, MVAEInitSource

MVAE_FORMAT = "mvdpp-mvae"
RUN_ARCHITECTURE = "architecture.json"  # in a run's output_dir: the config its weights were trained under
C = TypeVar("C")


def with_prediction_type(model: MVDPPModel, prediction_type: PredictionType) -> MVDPPModel:
    """The same modules under a config with another prediction type (stage 1 -> 2 switch)."""
    schedule = dataclasses.replace(model.config.schedule, prediction_type=prediction_type)
    return _rewrap(model, dataclasses.replace(model.config, schedule=schedule))


def with_image_size(model: MVDPPModel, image_size: int) -> MVDPPModel:
    if not image_size or image_size == model.config.image_size:
        return model
    return _rewrap(model, dataclasses.replace(model.config, image_size=image_size))


def _rewrap(model: MVDPPModel, config: ModelConfig) -> MVDPPModel:
    """The same modules (shared, not copied) under another config."""
    return MVDPPModel(
        config,
        unet=model.unet,
        vae=model.vae,
        image_encoder=model.image_encoder,
        with_image_encoder=model.image_encoder is not None,
    )


def run_architecture(output_dir: Path, config: C, *, resuming: bool, is_main: bool) -> C:
    """The architecture config a run trains: the one recorded when it started.

    A new run records ``config`` in ``output_dir/architecture.json``; a resumed run returns the
    recorded config, so a preset edited between start and resume (e.g. attention heads, which
    change no tensor shape) cannot silently change what the checkpoint's weights mean.
    """
    path = Path(output_dir) / RUN_ARCHITECTURE
    if resuming and path.is_file():
        return from_dict(type(config), json.loads(path.read_text()))
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_jsonable(dataclasses.asdict(config)), indent=1, sort_keys=True))
    return config


def rebuilt_under(module: nn.Module, config, output_dir: Path) -> nn.Module:
    """A new module of ``type(module)`` built from ``config`` holding ``module``'s weights."""
    rebuilt = type(module)(config)
    try:
        rebuilt.load_state_dict(module.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the run in {output_dir} was started with another architecture ({RUN_ARCHITECTURE}) whose "
            f"weights do not fit the one configured now: {str(err).splitlines()[0]} Start a new run "
            "(another runtime.output_dir, or checkpoint.resume=false)."
        ) from None
    return rebuilt


def with_architecture(model: MVDPPModel, config: ModelConfig, output_dir: Path) -> MVDPPModel:
    """``model``'s weights rebuilt under ``config`` (the run's recorded architecture)."""
    if config == model.config:
        return model
    image_encoder = model.image_encoder
    if image_encoder is not None and config.image_encoder != model.config.image_encoder:
        image_encoder = rebuilt_under(image_encoder, config.image_encoder, output_dir)
    return MVDPPModel(
        config,
        unet=rebuilt_under(model.unet, config.unet, output_dir) if config.unet != model.config.unet else model.unet,
        vae=rebuilt_under(model.vae, config.vae, output_dir) if config.vae != model.config.vae else model.vae,
        image_encoder=image_encoder,
        with_image_encoder=image_encoder is not None,
    )


def build_mvdiff_model(init: ModelInitConfig, prediction_type: PredictionType) -> MVDPPModel:
    """The UNet trainer's model from its init config (preset, SD 2 inpainting or a bundle)."""
    for key in ("view_embedding_scale", "geometry_init_std"):
        if init.source is InitSource.BUNDLE and getattr(init, key):
            raise ValueError(
                f"init.{key}={getattr(init, key)} applies to new models; a bundle keeps its trained "
                f"weights: leave it at 0 with init.source=bundle."
            )
    if init.architecture and init.source is not InitSource.PRESET:
        raise ValueError(
            f"init.architecture={init.architecture} overrides a preset's architecture; init.source="
            f"{init.source.value} brings its own. Use init.source=preset, or leave init.architecture empty."
        )
    if init.source is InitSource.PRESET:
        torch.manual_seed(init.seed)
        model = MVDPPModel(preset_with(init.preset, init.architecture))
    elif init.source is InitSource.SD2_INPAINTING:
        _require(init.path, "init.path", "a local SD 2 inpainting folder (diffusers layout) or .safetensors file")
        model = convert_sd2_inpainting(
            init.path, image_encoder_path=init.image_encoder_path or None, image_size=init.image_size or 512
        )
    else:
        _require(init.path, "init.path", "the previous stage's exported .safetensors bundle")
        model = load_checkpoint(init.path)
    if init.mvae_path:
        vae = load_mvae(init.mvae_path)
        config = dataclasses.replace(model.config, vae=vae.config)
        model = MVDPPModel(
            config,
            unet=model.unet,
            vae=vae,
            image_encoder=model.image_encoder,
            with_image_encoder=model.image_encoder is not None,
        )
    if model.image_encoder is None:
        raise ValueError(
            "training needs an image encoder for the condition embeddings; set init.image_encoder_path to a "
            "transformers CLIP vision folder (OpenCLIP ViT-H/14), or start from a bundle that includes one."
        )
    if init.source is not InitSource.BUNDLE:
        with torch.no_grad():
            model.unet.unet.class_embedding.scale.fill_(init.view_embedding_scale)
        if model.unet.geometry is not None:
            model.unet.geometry.reset_parameters(init.geometry_init_std)
    model = with_image_size(model, init.image_size)
    return with_prediction_type(model, prediction_type)


def preset_with(name: str, overrides: dict) -> ModelConfig:
    """Preset ``name`` with nested field overrides applied (strict: unknown keys are named)."""
    return ModelConfig.from_dict(_merged(preset(name).to_dict(), overrides))


def _merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merged(base[key], value)
        else:
            out[key] = value
    return out


def build_mvae(init: MVAEInitConfig) -> tuple[MaskAwareVAE, int]:
    """The MVAE to fine-tune and the training image size."""
    if init.source is MVAEInitSource.PRESET:
        torch.manual_seed(init.seed)
        config = preset(init.preset)
        return MaskAwareVAE(config.vae), init.image_size or config.image_size
    _require(
        init.path, "init.path", "a local SD VAE folder" if init.source is MVAEInitSource.SD_VAE else "an MVAE file"
    )
    if init.source is MVAEInitSource.MVAE:
        return load_mvae(init.path), init.image_size or 512
    from diffusers import AutoencoderKL

    path = Path(init.path)
    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    rgb = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
    return MaskAwareVAE.from_rgb_vae(rgb), init.image_size or 512


def save_mvae(vae: MaskAwareVAE, path: str | Path, state: dict[str, Tensor] | None = None) -> Path:
    """An MVAE file: ``vae.*`` tensors + its VAEConfig as JSON metadata (safetensors only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else {f"vae.{k}": v for k, v in vae.vae.state_dict().items()}
    config = json.dumps(dataclasses.asdict(vae.config))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(tmp),
        metadata={"format": MVAE_FORMAT, "vae_config": config},
    )
    tmp.replace(path)
    return path


def load_mvae(path: str | Path) -> MaskAwareVAE:
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(f"MVAE file {path} must be an existing .safetensors written by train_mvae.py.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MVAE_FORMAT:
        raise ValueError(
            f"{path.name} is not an MVAE file (metadata format={meta.get('format')!r}); use train_mvae.py's export."
        )
    vae = MaskAwareVAE(from_dict(VAEConfig, json.loads(meta["vae_config"])))
    tensors = load_file(str(path))
    vae.vae.load_state_dict({k.removeprefix("vae."): v for k, v in tensors.items()}, strict=True)
    return vae


def load_trained(module: nn.Module, weights: dict[str, Tensor]) -> None:
    """Load full trained weights (EMA or raw, keyed as ``module.named_parameters``)."""
    result = module.load_state_dict(weights, strict=False)
    params = {n for n, _ in module.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
        )


def model_with_trained_weights(model: MVDPPModel, weights: dict[str, Tensor]) -> MVDPPModel:
    """A CPU copy of ``model`` holding trained weights keyed as ``TrainedModules``: ``unet.*``,
    and ``image_encoder.*`` when the encoder was trained (else it and the VAE are shared)."""
    unknown = sorted(k for k in weights if not k.startswith(("unet.", "image_encoder.")))
    if unknown:
        raise ValueError(
            f"trained weights {unknown[:3]} are not keyed unet.* / image_encoder.*: a checkpoint of an older "
            "layout or of another trainer."
        )
    unet = MultiViewUNet(model.config.unet)
    load_trained(unet, _under(weights, "unet."))
    image_encoder = model.image_encoder
    encoder_weights = _under(weights, "image_encoder.")
    if encoder_weights:
        image_encoder = ImageEncoder(model.config.image_encoder)
        load_trained(image_encoder, encoder_weights)
        image_encoder = image_encoder.float().eval()
    return MVDPPModel(
        model.config,
        unet=unet.float().eval(),
        vae=model.vae,
        image_encoder=image_encoder,
        with_image_encoder=image_encoder is not None,
    )


def _under(weights: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def export_bundle(model: MVDPPModel, weights: dict[str, Tensor], path: str | Path, stage: str) -> Path:
    """Write the bundle ``load_checkpoint`` reads, with the trained (EMA) UNet weights."""
    export = model_with_trained_weights(model, weights)
    vae_device = next(model.vae.parameters()).device
    export.vae.to("cpu")
    if export.image_encoder is not None:
        export.image_encoder.to("cpu")
    try:
        return save_checkpoint(export, path, metadata={"training_stage": stage})
    finally:
        model.vae.to(vae_device)
        if model.image_encoder is not None:
            model.image_encoder.to(vae_device)


def _require(value: str, key: str, what: str) -> None:
    if not value:
        raise ValueError(f"{key} is empty; set it to {what}.")
