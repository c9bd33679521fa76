"""The flow diagnostics of train/diagnostics.py measure what they claim: silhouette consistency
separates one object's views from views of different objects, and the attention recorder reads
exactly the uniform share from attention that cannot tell keys apart."""

import torch
from tiny_models import tiny_model

from mvdpp_core.model import Condition
from train.data.dataset import to_tensors
from train.diagnostics import attention_flow, condition_share, silhouette_consistency
from train.procedural.render import render_object


def _rig_masks(index: int) -> torch.Tensor:
    return to_tensors(render_object("heldout", index, size=64).targets, 64)[1][:, 0]  # 32 64 64


def test_silhouette_consistency_of_true_views_is_high_and_of_mixed_objects_low():
    masks = [_rig_masks(i) for i in range(3)]
    assert silhouette_consistency(masks[0]) > 0.95
    mixed = torch.stack([masks[v % 3][v] for v in range(32)])  # each view from another object
    assert silhouette_consistency(mixed) < 0.75
    blobs = masks[0].roll(shifts=9, dims=0)  # right masks, wrong rig slots
    assert silhouette_consistency(blobs) < silhouette_consistency(masks[0]) - 0.2


@torch.no_grad()
def test_attention_recorder_reads_the_uniform_share_from_blind_attention():
    model = tiny_model(0, view_scale=0.5)
    for name, param in model.unet.named_parameters():  # queries and keys all zero: uniform attention
        if "attn1.to_q" in name or "attn1.to_k" in name:
            param.zero_()
    g = torch.Generator().manual_seed(0)
    objects = [
        (
            torch.randn(1, 34, 4, 16, 16, generator=g),
            Condition(torch.randn(1, 2, 4, 16, 16, generator=g), torch.randn(1, 2, 32, generator=g)),
        )
    ]
    flow = attention_flow(model, objects, 900)
    assert len(flow) == 4  # the tiny UNet's global attention layers
    for layer in flow:
        assert abs(layer["cond_mass"] - 2 / 34) < 1e-5 and abs(layer["uniform_mass"] - 2 / 34) < 1e-9
        assert abs(layer["own_view_mass"] - 1 / 34) < 1e-5
        assert abs(layer["entropy"] - 1.0) < 1e-4


@torch.no_grad()
def test_condition_share_is_exactly_zero_when_the_condition_cannot_matter():
    model = tiny_model(0, view_scale=0.5)
    model.unet.set_attention_backend("sdpa", global_attention=False)  # targets never see the condition views
    g = torch.Generator().manual_seed(1)
    objects = [
        (
            torch.randn(1, 33, 4, 16, 16, generator=g),
            Condition(torch.randn(1, 1, 4, 16, 16, generator=g), torch.zeros(1, 1, 32)),
        )
        for _ in range(2)
    ]
    assert condition_share(model, objects, 500)["share"] == 0.0  # bit-identical target outputs
    model.unet.set_attention_backend("sdpa", global_attention=True)
    assert abs(condition_share(model, objects, 500)["share"]) > 1e-7  # small: untrained attention is near uniform
