"""LoadMVDPP: a checkpoint from the ``mvdpp`` model folder onto a device, as MVDPP_MODEL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..mvdpp_core.sampling_defaults import EMBEDDED_CHECKPOINT, ensemble_partners, is_recipe_model
from ._checks import check_choice, first_error
from ._comfy import MVDPPModelSocket, folder_paths, io, model_management, schema

FOLDER_NAME = "mvdpp"
# The small checkpoint the pack ships (DESIGN section 7); listed only when the file exists.
EMBEDDED_DEFAULT = EMBEDDED_CHECKPOINT  # shipped in the pack's models/
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ["auto", "cpu", "cuda"]
DTYPE_CHOICES = ["auto", *DTYPES]
ATTENTION_CHOICES = ["auto", "sdpa", "xformers"]
# Working memory on top of the weights while sampling: activations of 2 x (32 + n) views.
LOAD_HEADROOM = 1.5


@dataclass
class LoadedModel:
    """What flows through an MVDPP_MODEL socket: the model, its file name, an optional ComfyUI
    CLIP vision model used instead of a bundled image encoder, and the models whose masks the
    sampler averages with the model's (the embedded default's partner; the model's colours are kept)."""

    model: Any  # mvdpp_core.model.MVDPPModel
    name: str
    clip_vision: Any | None = None
    recipe: bool = False  # a model of the default procedural recipe (mvdpp_core.sampling_defaults)
    partners: tuple[Any, ...] = ()  # mvdpp_core.model.MVDPPModel each

    @property
    def models(self) -> Any:
        """What ``mvdpp_core.pipeline.generate`` takes: the model, or it and its partners."""
        return (self.model, *self.partners) if self.partners else self.model


def register_model_folder() -> None:
    """Register ``models/mvdpp`` so ``extra_model_paths.yaml`` entries ``mvdpp: <dir>`` add to it.

    ComfyUI reads extra_model_paths.yaml before loading node packs; an entry for a folder
    nobody registered yet creates it with no extension filter, so we keep its paths and
    set the filter. Pickle-based files are listed on purpose: choosing one gives an error
    that explains why it is refused, instead of a file that silently never appears.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    folder_paths.add_model_folder_path(FOLDER_NAME, default)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER_NAME]
    folder_paths.folder_names_and_paths[FOLDER_NAME] = (paths, set(folder_paths.supported_pt_extensions))


def checkpoint_names() -> list[str]:
    """The user's files in the mvdpp folder(s), with the embedded default first when shipped."""
    names = list(folder_paths.get_filename_list(FOLDER_NAME))
    if EMBEDDED_DEFAULT.is_file() and EMBEDDED_DEFAULT.name not in names:
        names.insert(0, EMBEDDED_DEFAULT.name)
    return names


def checkpoint_path(name: str) -> Path:
    """Full path of a listed checkpoint; a user's file shadows the embedded default's name."""
    found = folder_paths.get_full_path(FOLDER_NAME, name)
    if found is not None:
        return Path(found)
    if name == EMBEDDED_DEFAULT.name and EMBEDDED_DEFAULT.is_file():
        return EMBEDDED_DEFAULT
    folders = folder_paths.get_folder_paths(FOLDER_NAME)
    raise ValueError(
        f"checkpoint {name!r} is not in the mvdpp model folders {folders}; put the .safetensors file in "
        "ComfyUI/models/mvdpp/ (or a folder listed under 'mvdpp:' in extra_model_paths.yaml) and refresh."
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return model_management.get_torch_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was chosen but this machine has no usable CUDA GPU; choose 'auto' or 'cpu'.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        if model_management.should_use_bf16(device):
            return torch.bfloat16
        return torch.float16 if model_management.should_use_fp16(device) else torch.float32
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("dtype 'fp16' is not supported on the CPU (slow or missing kernels); choose 'fp32' or 'bf16'.")
    return DTYPES[dtype]


def load_model(path: Path, device: torch.device, dtype: torch.dtype, attention: str) -> Any:
    """Load on the CPU, make room on the GPU through ComfyUI's model management, then move."""
    from safetensors import SafetensorError

    from ..mvdpp_core.checkpoint import load_checkpoint  # heavy (torch + diffusers): import on use

    try:
        model = load_checkpoint(path, device="cpu", dtype=dtype)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path.name} could not be read ({err}); the file is truncated or corrupt, download it again."
        ) from None
    if device.type != "cpu":
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        model_management.free_memory(int(weights * LOAD_HEADROOM), device)
        model_management.soft_empty_cache()
        model.to(device)
    model.unet.set_attention_backend(attention)
    return model


class LoadMVDPP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MVDPP_LoadModel",
            search_aliases=["mvdiffusion", "mvdpp", "multiview model",
                            "multi-view diffusion", "image to 3d", "novel view"],
            display_name="Load MVDiffusion++ Model",
            category="MVDiffusion++/loaders",
            description="Loads an MVDiffusion++ checkpoint (.safetensors bundle) from models/mvdpp.",
            inputs=[
                io.Combo.Input(
                    "checkpoint", options=checkpoint_names(),
                    tooltip="A .safetensors bundle from ComfyUI/models/mvdpp (or an 'mvdpp:' folder in "
                    "extra_model_paths.yaml). mvdpp_default.safetensors is the small model shipped with the pack; "
                    "it loads with its partner (mvdpp_default_step5.safetensors), whose masks the sampler "
                    "averages with its own (its colours are kept).",
                ),
                io.Combo.Input(
                    "device", options=DEVICES, default="auto",
                    tooltip="Where the model runs. 'auto' follows ComfyUI's device choice (GPU if present).",
                ),
                io.Combo.Input(
                    "dtype", options=DTYPE_CHOICES, default="auto",
                    tooltip="Weight precision. 'auto': bf16 or fp16 on GPUs that support it, fp32 on the CPU.",
                ),
                io.Combo.Input(
                    "attention", options=ATTENTION_CHOICES, default="auto",
                    tooltip="Attention kernel. 'auto' uses xformers on CUDA when installed, else PyTorch SDPA.",
                ),
                io.ClipVision.Input(
                    "clip_vision", optional=True,
                    tooltip="Optional CLIP vision model (Load CLIP Vision) whose image embeddings replace the "
                    "checkpoint's bundled image encoder; its projection size must match the model.",
                ),
            ],
            outputs=[MVDPPModelSocket.Output(display_name="model", tooltip="The loaded MVDiffusion++ model.")],
        )

    @classmethod
    def validate_inputs(
        cls, checkpoint: str | None, device: str | None = None, dtype: str | None = None,
        attention: str | None = None,
    ) -> bool | str:
        """Refuse unknown options and missing, pickled or corrupt files before the prompt runs
        (reads the checkpoint's header only)."""
        from ..mvdpp_core.checkpoint import read_metadata

        return first_error(
            lambda: check_choice("device", device, DEVICES),
            lambda: check_choice("dtype", dtype, DTYPE_CHOICES),
            lambda: check_choice("attention", attention, ATTENTION_CHOICES),
            # None: linked from another node, checked when it runs
            lambda: checkpoint is None or read_metadata(checkpoint_path(checkpoint)),
        )

    @classmethod
    def execute(
        cls, checkpoint: str, device: str, dtype: str, attention: str, clip_vision: Any | None = None
    ) -> io.NodeOutput:
        torch_device = resolve_device(device)
        path = checkpoint_path(checkpoint)
        torch_dtype = resolve_dtype(dtype, torch_device)
        model = load_model(path, torch_device, torch_dtype, attention)
        partners = tuple(load_model(p, torch_device, torch_dtype, attention) for p in ensemble_partners(path))
        loaded = LoadedModel(model, checkpoint, clip_vision, recipe=is_recipe_model(path), partners=partners)
        return io.NodeOutput(loaded)
