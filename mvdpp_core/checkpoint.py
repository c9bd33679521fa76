"""The single-file checkpoint bundle, and conversion from Stable Diffusion 2 inpainting.

Format (version 1): one ``.safetensors`` file. Tensors are prefixed ``unet.``, ``vae.`` and
(optionally) ``image_encoder.``, each followed by the diffusers / transformers state-dict
key of that component. The metadata holds JSON strings: ``config`` (``ModelConfig``, which
includes prediction type and schedule), ``rig`` (the camera rig) and ``format`` /
``format_version``. Loading never unpickles: only safetensors is read.

The MVAE file (``train_mvae.py``'s export, ``init.mvae_path`` of the UNet trainer) lives
here too: ``vae.*`` tensors with metadata ``format`` = ``mvdpp-mvae`` and ``vae_config``
(``VAEConfig`` as JSON). Where an MVAE file is read, a bundle's VAE can be read instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import cameras
from .config import ModelConfig, UNetConfig, VAEConfig, from_dict
from .image_encoder import ImageEncoder
from .model import MVDPPModel
from .unet import MultiViewUNet
from .vae import MaskAwareVAE

FORMAT_NAME = "mvdpp"
FORMAT_VERSION = 1
MVAE_FORMAT = "mvdpp-mvae"
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


def bundle_modules(model: MVDPPModel) -> dict[str, nn.Module]:
    """The modules whose state dicts the bundle holds, by tensor-name prefix."""
    parts: dict[str, nn.Module] = {"unet": model.unet.unet, "vae": model.vae.vae}
    if model.image_encoder is not None:
        parts["image_encoder"] = model.image_encoder.model
    return parts


def model_state_dict(model: MVDPPModel) -> dict[str, Tensor]:
    """The bundle's tensors: ``<component>.<key>``, contiguous, on the CPU."""
    return {
        f"{prefix}.{key}": value.detach().to("cpu").contiguous()
        for prefix, module in bundle_modules(model).items()
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
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if size < 9:
        raise ValueError(
            f"{path.name} is {size} bytes: empty or cut short, not a safetensors bundle; copy or download it again."
        )
    # A safetensors file starts with a u64 header length and its JSON header ('{'); test that
    # first, since the length's low byte may be anything, pickle's 0x80 protocol mark included.
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{":
        if 8 + header_len > size:
            raise ValueError(
                f"{path.name} is not a valid safetensors file: its header claims {header_len} bytes but the file "
                f"has {size}, so it is truncated or corrupt; copy or download it again."
            )
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise ValueError(
            f"{path.name} holds pickled (torch.save) data despite its name; it is refused. "
            "Re-save the weights with safetensors."
        )


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r} ({type(path).__name__}) must be a str or Path to a .safetensors bundle.")
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))[:5]
        raise ValueError(
            f"checkpoint {path} is a directory, not a file; give the .safetensors file itself"
            + (f" (this directory holds {found})." if found else ".")
        )
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; put .safetensors bundles in models/mvdpp/.")
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The bundle's metadata, after checking the file is a readable safetensors bundle."""
    path = _check_path(path)
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
    raw = meta.get("format_version", "0")
    if not raw.isdigit():
        raise ValueError(
            f"{path.name}: metadata format_version={raw!r} is not an integer (this code writes "
            f"{FORMAT_VERSION!r}); the metadata was edited or corrupted: re-export the bundle with save_checkpoint."
        )
    if int(raw) > FORMAT_VERSION:
        raise ValueError(
            f"{path.name} has format version {int(raw)}; this code reads up to {FORMAT_VERSION}. Update the node pack."
        )
    return meta


# The node's dtype names, torch's, and float64 for numerical checks.
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
               "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


def resolve_device_dtype(device: object, dtype: object) -> tuple[torch.device, torch.dtype | None]:
    """Check a device and dtype before loading: names the node's choices, and CUDA's absence."""
    allowed = "'cpu', 'cuda', 'cuda:N' or 'mps'"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device={device!r} must be a string ({allowed}) or a torch.device.")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device name; allowed: {allowed}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but this machine has no CUDA GPU; use device='cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use 'cuda' or 'cuda:0'."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} was requested but MPS is not available here; use device='cpu'.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported; allowed: {allowed}.")
    if dtype is None:
        return dev, None
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return dev, DTYPE_NAMES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dev, dtype
    raise ValueError(
        f"dtype={dtype!r} is not a weight type this model runs in; allowed: None (as stored), "
        "'fp32', 'fp16', 'bf16' or torch.float32 / torch.float16 / torch.bfloat16."
    )


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> MVDPPModel:
    """Rebuild the model from a bundle's config and load its tensors (strictly).

    ``dtype`` takes a torch dtype or the node's names ('fp32', 'fp16', 'bf16'); None keeps the
    stored one. The file's tensor names, shapes and types are checked against the config
    before the model is built, so a file that does not hold the model it describes costs no memory.
    """
    device, dtype = resolve_device_dtype(device, dtype)
    path = _check_path(path)
    meta = read_metadata(path)
    config = _read_config(path, meta)
    has_encoder = check_bundle_tensors(path, config)
    tensors = load_file(str(path))
    model = MVDPPModel(config, with_image_encoder=has_encoder)
    load_model_state(model, tensors, source=path.name)
    model.to(device=device, dtype=dtype)
    return model.eval()


def read_bundle_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` a bundle stores, checked, without reading its tensors."""
    path = _check_path(path)
    return _read_config(path, read_metadata(path))


def _read_config(path: Path, meta: dict[str, str]) -> ModelConfig:
    """The stored ``ModelConfig``, its JSON value types checked before any dataclass is built."""
    try:
        data = json.loads(meta["config"])
        _check_config_values(ModelConfig, data, "")
        config = ModelConfig.from_dict(data)
        config.validate()
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(
            f"{path.name}: the stored architecture config is unreadable ({err}); re-export the bundle with "
            "save_checkpoint."
        ) from None
    return config


def _check_config_values(cls: type, data: object, path: str) -> None:
    """Type-check a config's JSON against the dataclass hints: ints not negative, floats finite.

    Unknown keys are left to ``from_dict``, which names them with the allowed ones.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{path or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in hints:
            _check_config_value(hints[name], value, f"{path}.{name}" if path else name)


def _check_config_value(hint: object, value: object, path: str) -> None:
    if dataclasses.is_dataclass(hint):
        _check_config_values(hint, value, path)
    elif typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not value:
            raise ValueError(f"{path}={value!r} must be a non-empty list")
        for i, item in enumerate(value):
            _check_config_value(typing.get_args(hint)[0], item, f"{path}[{i}]")
    elif hint is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{path}={value!r} must be a non-negative integer")
    elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"{path}={value!r} must be a finite number")
    elif hint in (str, bool) and not isinstance(value, hint):
        raise ValueError(f"{path}={value!r} must be a {hint.__name__}")


VIEW_SCALE_KEY = "unet.class_embedding.scale"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def check_bundle_tensors(path: Path, config: ModelConfig) -> bool:
    """Compare the file's tensor names, shapes and types (its header) with the model ``config``
    describes, built on the meta device (no memory); return whether it bundles an image encoder."""
    with safe_open(str(path), framework="pt") as f:
        given = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    if given.get(VIEW_SCALE_KEY, ((1,),))[0] == ():  # written before the scale became (1,)
        given[VIEW_SCALE_KEY] = ((1,), given[VIEW_SCALE_KEY][1])
    has_encoder = any(k.startswith("image_encoder.") for k in given)
    try:
        with torch.device("meta"):
            skeleton = MVDPPModel(config, with_image_encoder=has_encoder)
    except Exception as err:  # noqa: BLE001 - any failure means the stored config cannot describe a model
        raise ValueError(
            f"{path.name}: the stored architecture config cannot build a model ({type(err).__name__}: {err}); "
            "re-export the bundle with save_checkpoint."
        ) from None
    expected = {
        f"{prefix}.{k}": (tuple(v.shape), v.dtype)
        for prefix, module in bundle_modules(skeleton).items()
        for k, v in module.state_dict().items()
    }
    want = sum(math.prod(shape) for shape, _ in expected.values())
    have = sum(math.prod(shape) for shape, _ in given.values())
    sizes = "" if want == have else (
        f" Its config describes {want:,} parameters, but the file holds {have:,} values: the file is truncated "
        "or its config does not belong to its weights."
    )
    _raise_problems(_tensor_problems(expected, given), path.name, sizes)
    return has_encoder


def _tensor_problems(expected: dict[str, tuple], given: dict[str, tuple]) -> list[str]:
    """Missing, unexpected, mis-shaped and wrongly typed tensors (type: a torch dtype or a
    safetensors dtype name), at most 5 of each kind."""
    missing = [f"missing {k}" for k in sorted(set(expected) - set(given))]
    unexpected = [f"unexpected {k}" for k in sorted(set(given) - set(expected))]
    shapes, types = [], []
    for k in sorted(set(given) & set(expected)):
        (gs, gt), (es, et) = given[k], expected[k]
        if tuple(gs) != tuple(es):
            shapes.append(f"{k}: file {tuple(gs)} vs config {tuple(es)}")
        g_float = gt.is_floating_point if isinstance(gt, torch.dtype) else gt in _FLOAT_DTYPES
        g_name = str(gt).removeprefix("torch.") if isinstance(gt, torch.dtype) else _safetensors_name(gt)
        if g_float != et.is_floating_point or (not g_float and g_name != str(et).removeprefix("torch.")):
            types.append(f"{k}: file holds {g_name}, the model needs {str(et).removeprefix('torch.')}")
    return missing[:5] + unexpected[:5] + shapes[:5] + types[:5]


def _safetensors_name(dtype: str) -> str:
    return {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8",
            "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}.get(dtype, dtype)


def _raise_problems(problems: list[str], source: str, note: str = "") -> None:
    if not problems:
        return
    types = [p for p in problems if "file holds" in p]
    if types and len(types) == len(problems):
        raise ValueError(
            f"{source} holds tensors of the wrong type ({'; '.join(types[:4])}): bundles hold float weights "
            "(quantised or integer tensors are not supported); re-export it with save_checkpoint."
        )
    raise ValueError(
        f"{source} does not match its architecture config ({len(problems)} problem(s), first: "
        f"{'; '.join(problems[:6])}).{note} The file was saved from a different model shape; re-export it "
        "with save_checkpoint from the model that trained it."
    )


def load_model_state(model: MVDPPModel, tensors: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load bundle tensors into ``model``; report missing, unexpected, mis-shaped and mistyped keys."""
    tensors = _upgrade_view_scale(tensors)
    modules = bundle_modules(model)
    expected = {
        f"{prefix}.{k}": (tuple(v.shape), v.dtype) for prefix, module in modules.items()
        for k, v in module.state_dict().items()
    }
    problems = _tensor_problems(expected, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    stray = sorted({k.split(".")[0] for k in tensors} - set(modules))
    _raise_problems(problems + [f"unexpected component '{p}'" for p in stray], source)
    for prefix, module in modules.items():
        module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


def _upgrade_view_scale(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bundles written before the view-index scale became shape (1,) (FSDP2 refuses 0-dim
    parameters) hold it 0-dim; read it as (1,)."""
    if VIEW_SCALE_KEY in tensors and tensors[VIEW_SCALE_KEY].ndim == 0:
        return {**tensors, VIEW_SCALE_KEY: tensors[VIEW_SCALE_KEY].reshape(1)}
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


def read_mvae_config(path: str | Path) -> VAEConfig:
    """The ``VAEConfig`` of an MVAE file, or of a model bundle's VAE, without reading tensors."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(
            f"MVAE file {path} must be an existing .safetensors written by train_mvae.py (or a model bundle, "
            "whose VAE is then taken)."
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") == FORMAT_NAME:
        return read_bundle_config(path).vae
    if meta.get("format") != MVAE_FORMAT:
        raise ValueError(
            f"{path.name} is neither an MVAE file nor a model bundle (metadata format={meta.get('format')!r}); "
            "use train_mvae.py's export or an exported model.safetensors."
        )
    return from_dict(VAEConfig, json.loads(meta["vae_config"]))


def load_mvae(path: str | Path) -> MaskAwareVAE:
    """The MVAE of an MVAE file (strict)."""
    vae = MaskAwareVAE(read_mvae_config(path))
    load_mvae_weights(vae, path)
    return vae


def load_mvae_weights(vae: MaskAwareVAE, path: str | Path) -> None:
    """Load an MVAE file's tensors (or a model bundle's ``vae.*`` ones) into ``vae`` (strict)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k.removeprefix("vae."): f.get_tensor(k) for k in f.keys() if k.startswith("vae.")}
    vae.vae.load_state_dict(tensors, strict=True)
