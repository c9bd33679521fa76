"""Shared pytest fixtures: generic, so every test module can use them."""

from __future__ import annotations

from pathlib import Path

import pytest

# Helper modules next to the tests (comfyui_harness, tiny_models) are importable through
# pyproject's `pythonpath = [".", "tests"]`.


@pytest.fixture(autouse=True)
def _grad_mode_left_as_found():
    """A test (or code it calls in-process, e.g. a command's main) that switches torch's global
    grad mode off breaks every later training test; fail the test that did it, not the victims."""
    import torch

    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    torch.set_grad_enabled(before)
    assert after == before, "the test left torch's global grad mode changed; use a torch.no_grad() block"


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
