"""Model construction for training: the UNet trainer's ``ModelConfig`` resolved once and its
model built once from it, the MVAE to fine-tune, trained weights, bundle export.

(The MVAE file format lives in ``mvdpp_core.checkpoint`` beside the bundle format.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from mvdpp_core.checkpoint import (
    convert_sd2_inpainting,
    load_checkpoint,
    load_mvae,
    load_mvae_weights,
    read_bundle_config,
    read_mvae_config,
    save_checkpoint,
)
from mvdpp_core.config import ModelConfig, PredictionType, from_dict, preset, to_jsonable
from mvdpp_core.image_encoder import ImageEncoder
from mvdpp_core.model import MVDPPModel
from mvdpp_core.unet import MultiViewUNet
from mvdpp_core.vae import MaskAwareVAE

from .config import ConfigError, InitSource, ModelInitConfig, MVAEInitConfig, MVAEInitSource

RUN_ARCHITECTURE = "architecture.json"  # in a run's output_dir: the config its weights were trained under
C = TypeVar("C")


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
    """A new module of ``type(module)`` built from ``config`` holding ``module``'s weights (all
    of them; the new module may add only the epipolar bias's gains, set by the caller)."""
    rebuilt = type(module)(config)
    weights = module.state_dict()
    added = {k: v for k, v in rebuilt.state_dict().items() if k not in weights and ".epipolar_attention." in k}
    try:
        rebuilt.load_state_dict({**weights, **added}, strict=True)
    except RuntimeError as err:
        raise _other_architecture(output_dir, str(err)) from None
    return rebuilt


def _other_architecture(output_dir: Path | None, err: str) -> ValueError:
    return ValueError(
        f"the run in {output_dir} was started with another architecture ({RUN_ARCHITECTURE}) whose "
        f"weights do not fit the one configured now: {err.splitlines()[0]} Start a new run "
        "(another runtime.output_dir, or checkpoint.resume=false)."
    )


def build_mvdiff_model(
    init: ModelInitConfig,
    prediction_type: PredictionType,
    *,
    architecture: Callable[[ModelConfig], ModelConfig] | None = None,
    output_dir: Path | None = None,
) -> MVDPPModel:
    """The UNet trainer's model from its init config (preset, SD 2 inpainting or a bundle).

    The ``ModelConfig`` is resolved once (the source's architecture, then ``init.mvae_path``'s
    VAE, ``init.image_size`` and the stage's prediction type; ``architecture`` may replace the
    result by the run's recorded one, see ``run_architecture``) and the model is built once
    from it: a preset from scratch, a converted or loaded source from its modules (rebuilt
    only where the recorded architecture differs, holding the same weights).
    """
    _check_init(init)
    check_init_files(init)
    source = None
    if init.source is InitSource.PRESET:
        config = preset_with(init.preset, init.architecture)
    elif init.source is InitSource.SD2_INPAINTING:
        with _reading("init.path", init.path):
            source = convert_sd2_inpainting(init.path, image_encoder_path=init.image_encoder_path or None)
        config = source.config
    else:
        with _reading("init.path", init.path):
            source = load_checkpoint(init.path)
        config = _with_epipolar(source.config, init)
    if source is not None and source.image_encoder is None:
        raise ConfigError(
            "training needs an image encoder for the condition embeddings; set init.image_encoder_path to a "
            "transformers CLIP vision folder (OpenCLIP ViT-H/14), or start from a bundle that includes one."
        )
    config = resolved_config(config, init, prediction_type)
    if architecture is not None:
        config = _fitting(config, architecture(config), output_dir)
    if init.source is InitSource.PRESET:
        torch.manual_seed(init.seed)
    model = _assemble(config, source, init, output_dir)
    if init.source is InitSource.BUNDLE and init.epipolar_gain:
        model.unet.epipolar.reset_parameters(init.epipolar_gain)
    if init.source is not InitSource.BUNDLE:
        with torch.no_grad():
            model.unet.unet.class_embedding.scale.fill_(init.view_embedding_scale)
        if model.unet.geometry is not None:
            model.unet.geometry.reset_parameters(init.geometry_init_std)
        if model.unet.epipolar is not None:
            model.unet.epipolar.reset_parameters(init.epipolar_gain)
        if model.unet.condition_bias is not None:
            model.unet.condition_bias.reset_parameters(init.condition_bias_gain)
    return model


def check_init_files(init: ModelInitConfig) -> None:
    """The files the UNet trainer's init config names, there and of the right kind (a bundle's or an
    MVAE file's header is read, no tensors): a ConfigError naming the key otherwise. The trainer
    checks them first; ``scripts/train_default.py`` before it renders its objects."""
    if init.source is InitSource.SD2_INPAINTING:
        _require_path(init.path, "init.path", "a local SD 2 inpainting folder (diffusers layout) or .safetensors file")
        if init.image_encoder_path:
            _require_path(init.image_encoder_path, "init.image_encoder_path",
                          "a transformers CLIP vision folder (OpenCLIP ViT-H/14)")
    elif init.source is InitSource.BUNDLE:
        _require_path(init.path, "init.path", "the previous stage's exported .safetensors bundle")
        with _reading("init.path", init.path):
            read_bundle_config(init.path)
    if init.mvae_path:
        _require_path(init.mvae_path, "init.mvae_path", "an MVAE file written by train_mvae.py, or a model bundle")
        with _reading("init.mvae_path", init.mvae_path):
            read_mvae_config(init.mvae_path)


def _with_epipolar(config: ModelConfig, init: ModelInitConfig) -> ModelConfig:
    """A bundle's config, with epipolar attention switched on where ``init.epipolar_gain`` asks
    for it: the bias adds no trained weight (its gains are fixed buffers), so every weight of
    the bundle still loads, and the continuation learns to use the geometry it now sees."""
    if not init.epipolar_gain:
        return config
    if config.unet.epipolar_attention:
        raise ConfigError(
            f"init.epipolar_gain={init.epipolar_gain}: the bundle {init.path} already has epipolar attention, "
            "whose gains it keeps; leave init.epipolar_gain at 0 to continue it."
        )
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, epipolar_attention=True))


def _fitting(configured: ModelConfig, recorded: ModelConfig, output_dir: Path | None) -> ModelConfig:
    """``recorded`` when the configured model's weights fit it (the same tensor shapes, compared
    on the meta device: no memory), else the error that says to start a new run."""
    if recorded == configured:
        return recorded
    with torch.device("meta"):
        shapes = [
            {k: tuple(v.shape) for k, v in MVDPPModel(c).state_dict().items()} for c in (configured, recorded)
        ]
    if shapes[0] != shapes[1]:
        changed = sorted(k for k in shapes[0].keys() | shapes[1].keys() if shapes[0].get(k) != shapes[1].get(k))
        raise _other_architecture(output_dir, f"{len(changed)} tensors differ, e.g. {changed[:3]}.")
    return recorded


def _assemble(config: ModelConfig, source: MVDPPModel | None, init: ModelInitConfig, output_dir: Path | None):
    """The one ``MVDPPModel`` of ``config``: from scratch without a source, else the source's
    modules (a module whose config differs, under a recorded architecture, is rebuilt holding
    its weights); the VAE from ``init.mvae_path`` when given."""
    vae = None
    if init.mvae_path:
        vae = MaskAwareVAE(config.vae)
        load_mvae_weights(vae, init.mvae_path)
    if source is None:
        return MVDPPModel(config, vae=vae)
    parts = {"vae": vae}
    for name in ("unet", "vae", "image_encoder"):
        module, want = getattr(source, name), getattr(config, name)
        if parts.get(name) is None:
            parts[name] = module if getattr(source.config, name) == want else rebuilt_under(module, want, output_dir)
    return MVDPPModel(config, **parts)


def resolved_config(config: ModelConfig, init: ModelInitConfig, prediction_type: PredictionType) -> ModelConfig:
    """The source's config with the trainer's overrides: the MVAE file's VAE, the image size
    (``init.image_size``; 0 keeps the source's), the stage's prediction type and, when
    ``init.zero_terminal_snr`` asks, the zero-terminal-SNR schedule."""
    if init.mvae_path:  # build_mvdiff_model's check_init_files has read this header already
        config = dataclasses.replace(config, vae=read_mvae_config(init.mvae_path))
    if init.image_size:
        config = dataclasses.replace(config, image_size=init.image_size)
    schedule = dataclasses.replace(config.schedule, prediction_type=prediction_type,
                                   zero_terminal_snr=config.schedule.zero_terminal_snr or init.zero_terminal_snr)
    return dataclasses.replace(config, schedule=schedule)


def _check_init(init: ModelInitConfig) -> None:
    for key in ("view_embedding_scale", "geometry_init_std", "condition_bias_gain"):
        if init.source is InitSource.BUNDLE and getattr(init, key):
            raise ConfigError(
                f"init.{key}={getattr(init, key)} applies to new models; a bundle keeps its trained "
                f"weights: leave it at 0 with init.source=bundle."
            )
    if init.architecture and init.source is not InitSource.PRESET:
        raise ConfigError(
            f"init.architecture={init.architecture} overrides a preset's architecture; init.source="
            f"{init.source.value} brings its own. Use init.source=preset, or leave init.architecture empty."
        )


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
    _require_path(
        init.path, "init.path", "a local SD VAE folder" if init.source is MVAEInitSource.SD_VAE else "an MVAE file"
    )
    if init.source is MVAEInitSource.MVAE:
        with _reading("init.path", init.path):
            return load_mvae(init.path), init.image_size or 512
    from diffusers import AutoencoderKL

    path = Path(init.path)
    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    with _reading("init.path", init.path):
        rgb = AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
    return MaskAwareVAE.from_rgb_vae(rgb), init.image_size or 512


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
    # Buffers (the epipolar and condition-key gains) are fixed for the run and absent from the EMA: the live model's.
    buffers = {
        name: (b.full_tensor() if hasattr(b, "full_tensor") else b).detach().cpu()
        for name, b in model.unet.named_buffers()
    }
    load_trained(unet, {**buffers, **_under(weights, "unet.")})
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
        raise ConfigError(f"{key} is empty; set it to {what}.")


def _require_path(value: str, key: str, what: str) -> None:
    """A config key that names a local file or folder: set, and there."""
    _require(value, key, what)
    if not Path(value).exists():
        raise ConfigError(f"{key}={value} does not exist; set it to {what}.")


@contextlib.contextmanager
def _reading(key: str, value: str) -> Iterator[None]:
    """Reading the file a config key names: what is wrong with it (not a bundle, a pickle, a
    config that does not fit) is the key's error, said in one line, not a trainer's traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError) as err:
        raise ConfigError(f"{key}={value}: {err}") from err
