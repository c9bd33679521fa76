"""Architecture configs: one frozen dataclass per component, and the named presets.

A ``ModelConfig`` is stored as JSON in every checkpoint's metadata, so a checkpoint
rebuilds its own architecture. ``from_dict`` is strict: an unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class PredictionType(str, enum.Enum):
    """What the UNet predicts (improved-diffusion / diffusers naming)."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"


class TargetCondition(str, enum.Enum):
    """What the condition-latent channels of the target views hold."""

    EMPTY = "empty"  # MVAE(white image, zero mask): the paper's
    # The first condition view's latent, as Zero123 feeds its input view to every target: each
    # target token sees the input image at its own position from the first layer on, instead
    # of only through global attention. The branch mask still tells targets from conditions.
    FIRST_VIEW = "first_view"


class BetaSchedule(str, enum.Enum):
    SCALED_LINEAR = "scaled_linear"  # Stable Diffusion's
    LINEAR = "linear"


@dataclass(frozen=True)
class UNetConfig:
    """The diffusers ``UNet2DConditionModel`` arguments we set, plus our multi-view extras."""

    sample_size: int = 64
    in_channels: int = 9  # noisy latent (4) + branch mask (1) + condition latent (4)
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    use_linear_projection: bool = True
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    )
    num_view_slots: int = 42  # 32 target + 10 condition view-index embeddings
    global_attention: bool = True  # attn1 over all views of an object (False: per view)
    # Per-token geometry (rig rays of target views, image position of every view) projected
    # into each global attention layer's queries, keys and output (mvdpp_core.geometry). Off in
    # the paper's architecture; zero-initialised it leaves an initialised model equal to its base.
    geometry_encoding: bool = False
    # Epipolar attention bias (mvdpp_core.geometry.epipolar_bias): in global attention a target
    # token's logits on another rig view's tokens get a fixed per-head gain times the log of a
    # Gaussian of their distance to its epipolar segment; condition views stay pose-free (no bias
    # to or from them). Off in the paper's architecture; at gain 0 it leaves global attention as is.
    epipolar_attention: bool = False
    # Scaled cosine attention (Swin V2) in every global attention layer: queries and keys are
    # normalised per head and the logits are a learned per-head temperature (starting at 10) times
    # their cosine, so attention is peaked from the first step instead of starting uniform. Off in
    # the paper's architecture (it changes an initialised SD model); for models trained from scratch.
    cosine_attention: bool = False
    # Condition-key bias: in global attention every query's logit on a condition view's keys gets a
    # fixed per-head gain times log(number of target views), so a condition view keeps the same
    # share of (near-uniform) attention whether 6 targets are trained or 32 sampled. Off in the
    # paper's architecture; at gain 0 it leaves global attention as is.
    condition_attention_bias: bool = False
    # Log-length scaling (entropy-invariant attention): every global attention layer's query-key
    # logits are multiplied by log(L) / log(R * l), L the keys it attends to (all views' tokens), l
    # one view's tokens at that layer and R this reference view count, so attention trained at
    # about R views keeps its sharpness when 33 are sampled (softmax over L uniform keys has entropy
    # log L). The biases above are added unscaled. 0: off, the paper's; at R views exactly as off.
    length_scaled_attention: int = 0

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Arguments for ``UNet2DConditionModel(**kwargs)`` (our extras removed)."""
        kwargs = dataclasses.asdict(self)
        extras = ("num_view_slots", "global_attention", "geometry_encoding", "epipolar_attention", "cosine_attention",
                  "condition_attention_bias", "length_scaled_attention")
        for extra in extras:
            kwargs.pop(extra)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


@dataclass(frozen=True)
class VAEConfig:
    """The mask-aware VAE: an ``AutoencoderKL`` with RGB + mask in and out."""

    in_channels: int = 4
    out_channels: int = 4
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
        }


@dataclass(frozen=True)
class ImageEncoderConfig:
    """A transformers ``CLIPVisionModelWithProjection``; default OpenCLIP ViT-H/14."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward process; float64 at construction, cast at the point of use."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = BetaSchedule.SCALED_LINEAR
    prediction_type: PredictionType = PredictionType.EPSILON
    # Rescale the schedule so its last step holds no signal (Lin et al. 2024): SD's scaled-linear
    # schedule keeps sqrt(alpha_bar) = 0.068 of x0 at t = 999, which training sees and sampling from
    # pure noise does not. Needs v-prediction (epsilon is undefined there). False = the paper's.
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model from a checkpoint."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 512
    target_condition: TargetCondition = TargetCondition.EMPTY

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        """Check cross-component consistency; raise ValueError naming the fix."""
        if self.image_size % self.vae.downsample:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the VAE's downsampling factor "
                f"{self.vae.downsample}; use a multiple of {self.vae.downsample}."
            )
        if self.unet.out_channels != self.vae.latent_channels:
            raise ValueError(
                f"unet.out_channels={self.unet.out_channels} must equal vae.latent_channels="
                f"{self.vae.latent_channels}."
            )
        expected_in = 2 * self.vae.latent_channels + 1
        if self.unet.in_channels != expected_in:
            raise ValueError(
                f"unet.in_channels={self.unet.in_channels}; the 9-channel layout needs "
                f"2 * latent_channels + 1 = {expected_in}."
            )
        if self.unet.cross_attention_dim != self.image_encoder.projection_dim:
            raise ValueError(
                f"unet.cross_attention_dim={self.unet.cross_attention_dim} must equal "
                f"image_encoder.projection_dim={self.image_encoder.projection_dim} (one CLIP "
                "token per condition view)."
            )
        reference = self.unet.length_scaled_attention
        if isinstance(reference, bool) or not isinstance(reference, int) or reference == 1 or reference < 0:
            raise ValueError(
                f"unet.length_scaled_attention={reference!r}: give the reference number of views (an integer "
                "of at least 2, e.g. 8, the views of a training object) at which the logits are unscaled, "
                "or 0 to switch the scaling off."
            )
        if self.schedule.zero_terminal_snr and self.schedule.prediction_type is PredictionType.EPSILON:
            raise ValueError(
                "schedule.zero_terminal_snr=true with prediction_type=epsilon: at a zero-SNR last step the "
                "noise is the input itself, so epsilon says nothing of the object; use v_prediction."
            )


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from ``dataclasses.asdict`` output: enums by value, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict, strictly: unknown keys raise ValueError.

    Nested dataclasses, enums and tuples are converted from their JSON forms.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in {path or cls.__name__}; allowed: {sorted(fields)}."
        )
    hints = _resolved_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}{name}" if not path else f"{path}.{name}")
    return cls(**kwargs)


def _resolved_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _convert(hint: Any, value: Any, path: str) -> Any:
    import typing

    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = [m.value for m in hint]
            raise ValueError(f"{path}={value!r} is not one of {allowed}.") from None
    if origin is tuple:
        return tuple(value)
    return value


PRESETS: dict[str, ModelConfig] = {
    # Stable Diffusion 2 inpainting UNet and VAE shapes, OpenCLIP ViT-H/14, 512 px.
    "sd2": ModelConfig(),
    # A few million parameters and 64 px images: tests and CPU training.
    "tiny": ModelConfig(
        unet=UNetConfig(
            sample_size=16,
            block_out_channels=(64, 128),
            layers_per_block=1,
            attention_head_dim=(2, 4),  # diffusers reads this as head counts: 32-d heads, 3x faster than 8-d on CPU
            cross_attention_dim=32,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=VAEConfig(
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        ),
        image_encoder=ImageEncoderConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        image_size=64,
    ),
}


def preset(name: str) -> ModelConfig:
    """A named preset config ('sd2' or 'tiny')."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}.") from None
