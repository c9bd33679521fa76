"""Shared pytest fixtures: generic, so every test module can use them."""

from __future__ import annotations

from pathlib import Path

import pytest

# Helper modules next to the tests (comfyui_harness, tiny_models) are importable through
# pyproject's `pythonpath = [".", "tests"]`.


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded ``tiny``-preset MVDiffusion++ bundle (with its image encoder) on disk."""
    import torch

    from mvdpp_core import MVDPPModel, preset, save_checkpoint

    torch.manual_seed(0)
    model = MVDPPModel(preset("tiny"))
    return save_checkpoint(model, tmp_path_factory.mktemp("checkpoints") / "tiny.safetensors")


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The real ComfyUI checkout named by MVDPP_COMFYUI (scripts/test.sh sets it), else skip."""
    from comfyui_harness import comfyui_path

    path = comfyui_path()
    if path is None:
        pytest.skip("MVDPP_COMFYUI is not set to a ComfyUI folder (run the tests through scripts/test.sh)")
    return path
