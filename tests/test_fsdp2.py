"""The FSDP2 recipe on 2 gloo CPU ranks: accelerate's own wrapping with the 8-GPU config's
policy shards the UNet (the 0-dim view scale once made ``fully_shard`` refuse it), and one
optimisation step, a sharded checkpoint, a resume, the EMA of sharded parameters and the
export of gathered full tensors all equal one process holding the whole batch; so do two
steps with the objects' views split over the ranks (FSDP2 under view parallelism)."""

import pytest
import torch
from fsdp2_worker import WORLD, build, optimiser_and_ema, rank_main, rank_main_views, step
from spawn_ranks import run_ranks

from mvdpp_core.checkpoint import load_checkpoint


def reference() -> dict:
    """One process, no sharding, the whole batch of 2 objects per step."""
    model, module, batch = build()
    optimizer, ema = optimiser_and_ema(module)
    rows = slice(0, WORLD)
    loss1 = step(module, optimizer, ema, batch, rows, 1)
    params1 = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss2 = step(module, optimizer, ema, batch, rows, 2)
    params2 = {n: p.detach().clone() for n, p in module.named_parameters()}
    return {"losses": torch.stack([loss1, loss2]), "params1": params1, "params2": params2, "ema2": ema.params}


def group(result: dict, name: str) -> dict:
    return {k.removeprefix(name + "."): v for k, v in result.items() if k.startswith(name + ".")}


def assert_params_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=2e-5, rtol=1e-4, msg=f"{what}: {name}")


@pytest.mark.slow
def test_fsdp2_step_checkpoint_resume_ema_and_export_equal_one_process(tmp_path):
    ranks = run_ranks(rank_main, tmp_path, WORLD, timeout=400)
    ref = reference()
    got = ranks[0]
    n_params = len(ref["params1"])
    assert got["sharded_params"].item() == n_params  # every parameter is a DTensor shard, the scale included
    torch.testing.assert_close(got["losses"][:2], ref["losses"], atol=1e-5, rtol=1e-5)
    assert_params_close(group(got, "params1"), ref["params1"], "after one step")
    assert_params_close(group(got, "params2"), ref["params2"], "after two steps")
    moved = max((ref["params2"][k] - ref["params1"][k]).abs().max().item() for k in ref["params1"])
    assert moved > 1e-3  # the second step did move the weights, so equality below means something
    # Resumed from the sharded checkpoint written after step 1: the same second step.
    torch.testing.assert_close(got["losses"][2], got["losses"][1], atol=1e-6, rtol=0)
    assert_params_close(group(got, "params2_resumed"), group(got, "params2"), "resumed")
    assert_params_close(group(got, "ema2"), ref["ema2"], "EMA of the sharded parameters")
    for r in ranks[1:]:  # every rank gathered the same full tensors
        assert_params_close(group(r, "params2"), group(got, "params2"), "rank 1")
    exported = load_checkpoint(tmp_path / "export.safetensors")
    for name, value in exported.unet.named_parameters():
        torch.testing.assert_close(value, ref["ema2"][f"unet.{name}"], atol=2e-5, rtol=1e-4, msg=name)
    assert exported.unet.unet.class_embedding.scale.shape == (1,)


@pytest.mark.slow
def test_fsdp2_with_the_views_split_over_the_ranks_equals_one_process(tmp_path):
    """``parallel.view_group_size=2`` under the FSDP2 recipe: both ranks hold both objects and a
    share of their views (1 and 2: a rank holding a single view must still join the gathers,
    which it once skipped, mismatching the collectives); global attention gathers the rest, with
    gradient checkpointing as in the GPU stage configs. Two steps (AdamW, clipping, EMA) land
    where one unsharded process holding every view, without checkpointing, lands."""
    ranks = run_ranks(rank_main_views, tmp_path, WORLD, timeout=400)
    ref = reference()
    got = ranks[0]
    torch.testing.assert_close(got["losses"], ref["losses"], atol=1e-5, rtol=1e-5)
    assert_params_close(group(got, "params1"), ref["params1"], "after one step")
    assert_params_close(group(got, "params2"), ref["params2"], "after two steps")
    assert_params_close(group(got, "ema2"), ref["ema2"], "EMA of the sharded parameters")
    moved = max((ref["params2"][k] - ref["params1"][k]).abs().max().item() for k in ref["params1"])
    assert moved > 1e-3
    assert_params_close(group(ranks[1], "params2"), group(got, "params2"), "rank 1")


def test_bundles_with_a_0_dim_view_scale_still_load(tmp_path):
    """Before FSDP2 forced the scale to shape (1,) it was 0-dim (bundles written then, such as
    the previous embedded default, must still load)."""
    from safetensors.torch import save_file
    from tiny_models import tiny_model

    from mvdpp_core.checkpoint import model_state_dict
    from mvdpp_core.config import ModelConfig
    from mvdpp_core.unet import MultiViewUNet

    model = tiny_model(view_scale=0.25)
    tensors = model_state_dict(model)
    tensors["unet.class_embedding.scale"] = torch.tensor(0.25)  # as written before the change
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=dict(_bundle_metadata(model)))
    loaded = load_checkpoint(tmp_path / "old.safetensors")
    scale = loaded.unet.unet.class_embedding.scale
    assert scale.shape == (1,) and scale.item() == 0.25
    # A plain module load (training resume, EMA export) of an old 0-dim state dict too.
    unet = MultiViewUNet(ModelConfig.from_json(model.config.to_json()).unet)
    state = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    unet.unet.load_state_dict(state, strict=True)
    assert unet.unet.class_embedding.scale.item() == 0.25


def _bundle_metadata(model):
    import json

    from mvdpp_core.checkpoint import FORMAT_NAME, FORMAT_VERSION, rig_metadata

    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": model.config.to_json(),
        "rig": json.dumps(rig_metadata()),
    }
