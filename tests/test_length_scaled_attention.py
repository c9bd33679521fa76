"""Log-length scaled global attention (``UNetConfig.length_scaled_attention``): off in the presets;
at the reference view count the model is the plain one; elsewhere it is attention whose query map
is multiplied by log(L) / log(R * l); the biases are added unscaled; bad values are refused."""

import copy
import dataclasses
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention
from tiny_models import assert_permutes_with_views, unet_inputs

from mvdpp_core.attention import AttentionBackend, MultiViewAttnProcessor
from mvdpp_core.checkpoint import load_checkpoint, save_checkpoint
from mvdpp_core.config import ModelConfig, PredictionType, preset
from mvdpp_core.unet import MultiViewUNet
from train.config import ModelInitConfig
from train.models import build_mvdiff_model

PLAIN = preset("tiny").unet


def scaled_and_plain(reference: int = 4) -> tuple[MultiViewUNet, MultiViewUNet]:
    torch.manual_seed(0)
    plain = MultiViewUNet(PLAIN).eval()
    scaled = MultiViewUNet(dataclasses.replace(PLAIN, length_scaled_attention=reference)).eval()
    scaled.load_state_dict(plain.state_dict())
    return scaled, plain


def test_off_in_the_presets_and_no_weights_added():
    assert preset("sd2").unet.length_scaled_attention == 0 and preset("tiny").unet.length_scaled_attention == 0
    scaled, plain = scaled_and_plain()
    assert scaled.state_dict().keys() == plain.state_dict().keys()


@torch.no_grad()
def test_at_the_reference_view_count_the_model_is_the_plain_one_and_elsewhere_not():
    scaled, plain = scaled_and_plain(reference=4)
    for views, same in ((4, True), (7, False), (2, False)):
        sample, t, ids, ctx = unet_inputs(PLAIN, 2, views, size=16)
        a, b = scaled(sample, t, ids, ctx), plain(sample, t, ids, ctx)
        if same:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        else:
            assert (a - b).abs().max() > 1e-4, views


@torch.no_grad()
def test_scaling_equals_a_query_map_multiplied_by_the_log_length_ratio():
    """Global attention over v views of l tokens at reference R is plain global attention with
    ``to_q`` multiplied by log(v l) / log(R l): the logits, not the values, are scaled."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    views, tokens, reference = 9, 12, 3
    hidden = torch.randn(2 * views, tokens, 16)
    scaled = MultiViewAttnProcessor(global_views=True, backend=AttentionBackend.SDPA, length_reference=reference)
    out = scaled(attn, hidden, num_views=views)
    sharper = copy.deepcopy(attn)
    sharper.to_q.weight.mul_(math.log(views * tokens) / math.log(reference * tokens))
    plain = MultiViewAttnProcessor(global_views=True, backend=AttentionBackend.SDPA)
    torch.testing.assert_close(out, plain(sharper, hidden, num_views=views), atol=1e-6, rtol=1e-5)
    assert (out - plain(attn, hidden, num_views=views)).abs().max() > 1e-3


@torch.no_grad()
def test_the_biases_are_added_unscaled():
    """With the condition-key bias on and zero query maps (every q.k logit 0), attention is set by
    the bias alone: the scaled and the plain model agree exactly at any view count."""
    torch.manual_seed(0)
    config = dataclasses.replace(PLAIN, condition_attention_bias=True)
    plain = MultiViewUNet(config).eval()
    plain.condition_bias.reset_parameters(1.0)
    for name, module in plain.unet.named_modules():
        if name.endswith("attn1"):
            module.to_q.weight.zero_()
    scaled = MultiViewUNet(dataclasses.replace(config, length_scaled_attention=4)).eval()
    scaled.load_state_dict(plain.state_dict())
    sample, t, _, ctx = unet_inputs(PLAIN, 1, 8, size=8)
    ids = torch.tensor([[3, 9, 12, 20, 25, 30, 31, 32]])
    torch.testing.assert_close(scaled(sample, t, ids, ctx), plain(sample, t, ids, ctx), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_scaled_attention_permutes_with_the_views():
    scaled, _ = scaled_and_plain()
    sample, t, ids, ctx = unet_inputs(PLAIN, 2, 6, size=16)
    assert_permutes_with_views(scaled, sample, t, ids, ctx)


@pytest.mark.parametrize("value", [1, -2, True, 2.5, "8"])
def test_bad_reference_counts_are_refused_with_the_fix(value):
    config = dataclasses.replace(preset("tiny"), unet=dataclasses.replace(PLAIN, length_scaled_attention=value))
    with pytest.raises(ValueError, match=r"unet.length_scaled_attention=.*at least 2.*or 0"):
        config.validate()


def test_training_switch_and_the_checkpoint_keep_the_reference(tmp_path):
    init = ModelInitConfig(architecture={"unet": {"length_scaled_attention": 8}})
    model = build_mvdiff_model(init, PredictionType.V_PREDICTION)
    assert model.config.unet.length_scaled_attention == 8
    processors = [p for n, p in model.unet.unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert processors and all(p.length_reference == 8 for p in processors)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"))
    assert loaded.config.unet.length_scaled_attention == 8
    reloaded = [p for n, p in loaded.unet.unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert all(p.length_reference == 8 for p in reloaded)
    assert ModelConfig.from_json(model.config.to_json()) == model.config
