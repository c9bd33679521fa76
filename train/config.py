"""Training configs: one frozen dataclass per component, loaded strictly from YAML.

* Unknown keys fail, naming the key and the allowed ones (``mvdpp_core.config.from_dict``).
* Values are plain: a number field takes a number (YAML 1.1 reads ``1e-5`` as a string; such
  a string is accepted only when it *is* a number), never an expression like ``2*1e-4``.
* Command-line overrides use dotted paths: ``--set optim.lr=1e-5 --set stage.cond_dropout=0.1``
  (the value is parsed as YAML, so ``--set optim.betas=[0.9,0.99]`` works).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mvdpp_core.config import PredictionType, from_dict, to_jsonable

T = TypeVar("T")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """Settings that load but cannot run together (found while building the run, e.g. a switch
    the starting bundle already has): the trainers' command lines print it in one line, like a
    bad key, and exit with code 2."""


class Precision(str, enum.Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Device(str, enum.Enum):
    AUTO = "auto"  # the accelerator's device (GPU when there is one)
    CPU = "cpu"


class InitSource(str, enum.Enum):
    PRESET = "preset"  # random weights from mvdpp_core.config.preset(name)
    SD2_INPAINTING = "sd2_inpainting"  # local SD 2 inpainting folder or single file
    BUNDLE = "bundle"  # a previous stage's exported .safetensors bundle


class MVAEInitSource(str, enum.Enum):
    PRESET = "preset"  # random MVAE of a preset's VAE shape
    SD_VAE = "sd_vae"  # local diffusers SD VAE folder (or a model folder with vae/), converted
    MVAE = "mvae"  # a previous train_mvae.py export


@dataclass(frozen=True)
class DataConfig:
    """Where objects come from: exactly one of ``folders`` (a folder of rendered object
    folders, or several '::'-joined) or ``shards`` (webdataset URLs, brace-expanded,
    '::'-joined; paths or ``pipe:``)."""

    folders: str = ""
    shards: str = ""
    num_target_views: int = 8  # view dropout: targets kept per object (the paper's 8 of 32)
    num_workers: int = 0
    seed: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, linear warmup, constant, then (``decay_steps`` > 0) a cosine decay to 0 over the
    last ``decay_steps`` of ``max_steps``; batch sizes are per device."""

    lr: float = 1e-5
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    decay_steps: int = 0  # 0 = constant after warmup
    max_grad_norm: float = 1.0  # 0 = no clipping
    batch_size: int = 1
    grad_accum_steps: int = 1
    max_steps: int = 1000
    # 0 = no limit; else training stops at the first optimizer step that ends past this many
    # minutes of this process's training (resume and setup not counted), with a checkpoint and
    # the export, and the same command continues it. The LR schedule still counts to max_steps.
    max_minutes: float = 0.0


@dataclass(frozen=True)
class ModelInitConfig:
    """The UNet trainer's starting point."""

    source: InitSource = InitSource.PRESET
    preset: str = "tiny"
    path: str = ""  # SD 2 inpainting folder / .safetensors, or a bundle
    image_encoder_path: str = ""  # transformers CLIP vision folder (with sd2_inpainting)
    mvae_path: str = ""  # a fine-tuned MVAE (train_mvae.py export, or a model bundle: its VAE) replacing the VAE
    image_size: int = 0  # 0 = the source's own
    seed: int = 0  # weight init of presets
    # Starting value of the view-index embedding's scale. 0 (the design) keeps an initialised
    # model equal to its SD base; a from-scratch model has no base to keep, and from 0 its views
    # stay anonymous for thousands of steps (the scale reached 0.008 after 5500 CPU steps).
    # Not for source=bundle, which keeps its trained scale.
    view_embedding_scale: float = 0.0
    # Architecture overrides of a preset (source=preset only), as a nested mapping of
    # mvdpp_core.config.ModelConfig fields, e.g. {unet: {geometry_encoding: true}}; strict.
    architecture: dict[str, Any] = field(default_factory=dict)
    # Starting std of the geometry encoding's weights (UNetConfig.geometry_encoding). 0 keeps a
    # model initialised from SD 2 equal to its base; from scratch there is no base to keep, and
    # zero-initialised per-slot weights barely move (each slot gets gradient only when sampled).
    geometry_init_std: float = 0.0
    # Gain of the epipolar attention bias (UNetConfig.epipolar_attention), fixed for the run and
    # stored with the model. 0 keeps a model initialised from SD 2 equal to its base; from scratch,
    # 1 makes attention follow the rig's epipolar geometry from the first step. With
    # source=bundle it switches the bias on in a bundle that lacks it (the bias has no trained
    # weights, so every weight still loads); a bundle that has it keeps its gains.
    epipolar_gain: float = 0.0
    # Gain of the condition-key bias (UNetConfig.condition_attention_bias), fixed for the run and
    # stored with the model. 0 keeps a model initialised from SD 2 equal to its base; 1 gives each
    # condition view as much (uniform) attention as all target views together.
    condition_bias_gain: float = 0.0
    # Switch the model's noise schedule to zero terminal SNR (ScheduleConfig.zero_terminal_snr), from
    # any source: SD 2's weights or a bundle trained on the plain schedule continue on the rescaled
    # one, as Zero123++ fine-tuned SD. Stored with the model; false keeps the source's schedule.
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class MVAEInitConfig:
    source: MVAEInitSource = MVAEInitSource.PRESET
    preset: str = "tiny"
    path: str = ""
    image_size: int = 0  # 0 = the preset's image size (512 for an SD VAE)
    seed: int = 0
    # false = only the decoder learns: the encoder (and its quant_conv) stay exactly as loaded, so
    # the latent space a trained UNet was fitted to does not move and the UNet stays valid.
    train_encoder: bool = True


@dataclass(frozen=True)
class StageConfig:
    """One of the paper's UNet stages: prediction type and condition-view counts."""

    name: str = "stage1"
    prediction_type: PredictionType = PredictionType.EPSILON
    single_view_prob: float = 1.0  # P(k = 1); otherwise k ~ U{2..max_cond_views}
    max_cond_views: int = 1
    cond_dropout: float = 0.1  # P(condition dropped) per object, for classifier-free guidance
    # Drop the condition only from objects with at most this many condition views (0 = from any,
    # the paper's). A high cond_dropout that teaches views to read their siblings otherwise also
    # halves the 2-10-view objects; the null condition is the same for every view count.
    cond_dropout_max_views: int = 0
    cond_loss_weight: float = 1.0  # loss weight of the (trivial) condition-view denoising
    # Train the image encoder with the UNet. Off in the paper's recipe (CLIP stays frozen); on for
    # an encoder that starts from random weights (the tiny default), whose frozen embeddings
    # would barely depend on the image.
    train_image_encoder: bool = False
    # P(the image-embedding tokens are dropped while the condition latents stay), per object.
    # A trained image encoder offers a shortcut: one cross-attention token can carry the whole
    # object as a query-independent bias, and the path through the condition view's latent and
    # global attention (the one that carries geometry) is then never learned. 0 = the paper's.
    embedding_dropout: float = 0.0
    # With ``target_condition: first_view``: P(the targets hold the empty latent, the paper's
    # input, instead of the first view's), per object. The first view's latent in every target
    # lets each view be made on its own; without it the input can reach the targets only
    # through global attention, so this makes the cross-view path necessary part of the time.
    first_view_dropout: float = 0.0
    # Training timesteps are uniform (1, the paper's); s > 1 moves them toward high noise, where
    # the condition decides the object (u -> s u / (1 + (s - 1) u), SD3's shift).
    timestep_shift: float = 1.0
    # P(every view of an object draws its own timestep), per object; otherwise all its views share
    # one (the paper's). A view at lower noise than the others then holds what they must make,
    # which only global attention can read, so the cross-view path earns its keep in training
    # instead of being left unlearned while each view can be made on its own. 0 = the paper's.
    view_timestep_prob: float = 0.0
    # Weight of a loss on the masks that the target views' x0 predictions decode to (through the
    # frozen MVAE decoder) against the true masks: a squared error counted only on the wrong side
    # of each pixel's value (above 0 outside the object, below 1 inside). The latent loss weighs
    # each latent direction by its size, not by how much of the decoded mask it moves; this term
    # asks the predictions for the masks directly. 0 = the paper's (latent loss only).
    mask_loss_weight: float = 0.0


@dataclass(frozen=True)
class MVAELossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    mask_bce_weight: float = 1.0
    kl_weight: float = 1e-6
    # L1 + L2 on RGB averaged over the true foreground pixels only, times this weight: the whole-view
    # terms are mostly the white background, so a small object's colour barely moves them (the
    # embedded default's MVAE kept blue at 0.14 of its true spread). 0 = the paper's loss.
    foreground_weight: float = 0.0


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t))


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    validate_every: int = 1000  # 0 = never
    validation_steps: int = 20
    validation_sampler: str = "ddim"
    validation_guidance: float = 3.0


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3
    resume: bool = True  # continue from output_dir/checkpoints/latest when present
    export_name: str = "model.safetensors"


@dataclass(frozen=True)
class RuntimeConfig:
    output_dir: str = "outputs/run"
    device: Device = Device.AUTO
    precision: Precision = Precision.BF16
    gradient_checkpointing: bool = True
    attention_backend: str = "auto"  # auto | sdpa | xformers
    seed: int = 0
    allow_tf32: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    """View parallelism (train/view_parallel.py): each group of ``view_group_size`` ranks
    trains the same objects, its ranks holding near-equal shares of every object's views
    (global attention all-gathers keys and values over the group); data parallel across
    groups. 1 = off (each rank holds whole objects)."""

    view_group_size: int = 1


@dataclass(frozen=True)
class TrainConfig:
    """train_mvdiff.py: the multi-view UNet."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: ModelInitConfig = field(default_factory=ModelInitConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass(frozen=True)
class MVAETrainConfig:
    """train_mvae.py: the mask-aware VAE."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: MVAEInitConfig = field(default_factory=MVAEInitConfig)
    loss: MVAELossConfig = field(default_factory=MVAELossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build config ``cls`` from a YAML file plus dotted ``key=value`` overrides, strictly."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = _read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}.")
        data = loaded or {}
    for item in overrides:
        apply_override(data, item)
    config = from_dict(cls, coerce(cls, data))
    validate(config)
    return config


def load_cli_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> T:
    """``load_config`` for a command line: a bad key or value ends the process with exit code 2
    and one line, ``config error: <the key, the value, what is allowed, the fix>``."""
    try:
        return load_config(cls, path, overrides)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def exit_on_config_error(run: Callable[[], T]) -> T:
    """Run a trainer for a command line: a :class:`ConfigError` raised while it builds the run
    ends the process like a bad key (one line, exit code 2), not in a traceback."""
    try:
        return run()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        shipped = Path(__file__).resolve().parent / "configs"
        raise ValueError(
            f"config file {path} does not exist (or is not a file); pass one of train/configs/*.yaml, e.g. "
            f"{shipped.name}/{min(p.name for p in shipped.glob('*.yaml'))}, or a copy of one."
        )
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err}); fix the line named above.") from None


# Allowed values per dotted key: (test, what is allowed, how to fix). Floats must also be finite.
_Rule = tuple[Callable[[Any], bool], str, str]


def _at_least(lo: int, fix: str = "") -> _Rule:
    return (lambda v: v >= lo), f">= {lo}", fix


_UNIT = (lambda v: 0.0 <= v <= 1.0), "[0, 1]", "a probability"
RULES: dict[str, _Rule] = {
    "data.num_target_views": ((lambda v: 1 <= v <= 32), "[1, 32]", "the paper keeps 8 of the 32 target views"),
    "data.num_workers": _at_least(0, "0 reads in the main process"),
    "optim.lr": ((lambda v: v > 0), "> 0", "e.g. 1.0e-5"),
    "optim.betas": ((lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)), "two numbers in [0, 1)",
                    "e.g. [0.9, 0.999]"),
    "optim.weight_decay": _at_least(0),
    "optim.eps": ((lambda v: v > 0), "> 0", "e.g. 1.0e-8"),
    "optim.warmup_steps": _at_least(0, "0 = no warmup"),
    "optim.decay_steps": _at_least(0, "0 = no decay; N decays the LR to 0 over the last N of optim.max_steps"),
    "optim.max_grad_norm": _at_least(0, "0 = no clipping"),
    "optim.batch_size": _at_least(1, "it is per device"),
    "optim.grad_accum_steps": _at_least(1, "1 = no accumulation"),
    "optim.max_steps": _at_least(1, "it counts optimizer steps, e.g. 1000"),
    "optim.max_minutes": _at_least(0, "0 = no time limit; e.g. 90 stops after 90 minutes with a checkpoint"),
    "init.image_size": _at_least(0, "0 = the source's (or preset's) own size"),
    "stage.single_view_prob": _UNIT,
    "stage.max_cond_views": ((lambda v: 1 <= v <= 10), "[1, 10]", "the model takes 1 to 10 condition views"),
    "stage.cond_dropout": _UNIT,
    "stage.cond_dropout_max_views": ((lambda v: 0 <= v <= 10), "[0, 10]",
                                     "0 = every object; 1 = only objects with one condition view"),
    "stage.embedding_dropout": _UNIT,
    "stage.first_view_dropout": _UNIT,
    "stage.view_timestep_prob": _UNIT,
    "stage.timestep_shift": ((lambda v: v > 0), "> 0", "1 = uniform timesteps; 3 puts 75 % in the noisier half"),
    "stage.cond_loss_weight": _at_least(0),
    "stage.mask_loss_weight": _at_least(0, "0 = the latent loss only; e.g. 1"),
    "loss.l1_weight": _at_least(0),
    "loss.l2_weight": _at_least(0),
    "loss.mask_bce_weight": _at_least(0),
    "loss.foreground_weight": _at_least(0),
    "loss.kl_weight": _at_least(0),
    "ema.decay": ((lambda v: 0 <= v < 1), "[0, 1)", "e.g. 0.9999; set ema.enabled=false for no EMA"),
    "logging.log_every": _at_least(1, "steps between log lines"),
    "logging.validate_every": _at_least(0, "0 = never"),
    "logging.validation_steps": ((lambda v: 1 <= v <= 1000), "[1, 1000]", "e.g. 20"),
    "logging.validation_sampler": ((lambda v: v in ("ddpm", "ddim", "dpmpp_2m")), "'ddpm', 'ddim' or 'dpmpp_2m'", ""),
    "logging.validation_guidance": _at_least(0, "1 = off"),
    "checkpoint.every": _at_least(1, "optimizer steps between checkpoints"),
    "checkpoint.keep_last": _at_least(1, "the newest checkpoints kept on disk; older ones are deleted"),
    "checkpoint.export_name": ((lambda v: v.endswith(".safetensors") and Path(v).name == v and v != ".safetensors"),
                               "a file name ending in .safetensors", "e.g. model.safetensors (written to export/)"),
    "runtime.output_dir": ((lambda v: bool(v.strip())), "a folder path", "e.g. outputs/run"),
    "runtime.attention_backend": ((lambda v: v in ("auto", "sdpa", "xformers")), "'auto', 'sdpa' or 'xformers'", ""),
}


def validate(config: Any) -> None:
    """Check every value of a loaded training config against ``RULES`` (and floats are finite);
    raise ValueError naming the key, the value, what is allowed and the fix."""
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for f in dataclasses.fields(part):
            value, path = getattr(part, f.name), f"{section.name}.{f.name}"
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ValueError(f"{path}={value!r} must be a finite number.")
            rule = RULES.get(path)
            if rule is not None and not rule[0](value):
                fix = f" ({rule[2]})" if rule[2] else ""
                raise ValueError(f"{path}={value!r} is not allowed; allowed: {rule[1]}{fix}.")
    optim = getattr(config, "optim", None)
    if isinstance(optim, OptimConfig) and optim.decay_steps > optim.max_steps:
        raise ValueError(
            f"optim.decay_steps={optim.decay_steps} exceeds optim.max_steps={optim.max_steps}; allowed: "
            "0 to optim.max_steps (the LR decays over the last decay_steps of the run)."
        )
    init, stage = getattr(config, "init", None), getattr(config, "stage", None)
    if (isinstance(init, ModelInitConfig) and init.zero_terminal_snr and isinstance(stage, StageConfig)
            and stage.prediction_type is PredictionType.EPSILON):
        raise ValueError(
            "init.zero_terminal_snr=True with stage.prediction_type=epsilon: at a zero-SNR last step the noise "
            "is the input itself, so epsilon says nothing of the object; allowed: v_prediction (set "
            "stage.prediction_type=v_prediction) or init.zero_terminal_snr=false."
        )
    if isinstance(init, MVAEInitConfig) and not init.train_encoder and init.source is MVAEInitSource.PRESET:
        raise ValueError(
            "init.train_encoder=False with init.source=preset would freeze a randomly initialised encoder; "
            "allowed: false only with init.source=mvae or sd_vae (a trained encoder to keep), else set "
            "init.train_encoder=true."
        )


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} is not 'section.key=value' (e.g. optim.lr=1e-5).")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is a value, not a section.")
    node[leaf] = yaml.safe_load(raw)


def coerce(cls: type, data: Any, path: str = "") -> Any:
    """Type-check plain values against the dataclass hints (unknown keys pass through so that
    ``from_dict`` reports them with the allowed list)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or cls.__name__}: expected a mapping of keys, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: (_coerce_value(hints[k], v, f"{path}.{k}" if path else k) if k in names else v) for k, v in data.items()}


def _coerce_value(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return coerce(hint, value, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value  # from_dict converts and names the allowed values
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} must be true or false.")
        return value
    if hint in (int, float):
        return _number(hint, value, path)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r} must be a string (quote it in YAML).")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} must be a list, e.g. [0.9, 0.999].")
        item = typing.get_args(hint)[0]
        return tuple(_coerce_value(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return value
    return value


def _number(kind: type, value: Any, path: str) -> int | float:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value) if kind is float else value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{path}={value!r} must be an integer (plain value, no arithmetic).")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(
            f"{path}={value!r} must be a number written out (e.g. 1.0e-5); YAML configs hold no arithmetic."
        )
    return float(value) if kind is float else value


def dump_config(config: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_jsonable(dataclasses.asdict(config)), sort_keys=False))
    return path
